"""The tuned Hopper configs compile for sm_90a with the Triton installed here (no GPU needed; the GPU tests are not in
CI), and each default program fits twice per SM (shared memory; registers without heavy spills): the occupancy the
configs are chosen for (triton/config.py).

The compile runs in a subprocess: this process's kernels are Triton interpreter objects (conftest.py)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.join(os.path.dirname(__file__), "..")
# The defaults for a GQA group of 4 (config.CONFIGS["cuda_16bit"]), as scripts/check_sm90_compile.py names them.
DEFAULTS = ["fwd pack 16tok x64 w4 s3 merged", "kv 64x64 w4 s2 merged", "dq pack 16tok(x4=64 rows) x64 w4 s2 merged"]
SM_SHARED_KB = 228  # shared memory of an H100/H200 SM; each resident block also reserves 1 KB of it
SPILL_BYTES = 256  # Triton 3.6 spills ~116 bytes in the KV program, 3.9 none; the options' programs spill 300-820


# The Gluon versions of the backward's kernels that the defaults run on Hopper (triton/backward_gluon.py), at a GQA
# group of 4 and of 7.
GLUON = ["kv gluon 64x64 w4 s2", "dq gluon 16tok(x4) x64 w4 s2", "dq gluon 9tok(x7) x64 w4 s2 g7"]


@functools.lru_cache(maxsize=None)
def _compile(names: tuple[str, ...]):
    """scripts/check_sm90_compile.py's row of each variant in ``names``: name -> its columns (one compile per tuple:
    both tests read the defaults' rows)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_sm90_compile.py"), "--exact", "--only",
                        *names], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {}
    for line in r.stdout.splitlines():
        for name in names:
            if line.startswith(name + " ") or line.startswith(name + "\t"):
                rows[name] = line[len(name):].split()
    assert set(rows) == set(names), r.stdout
    return rows, r.stdout


def _fits_twice(rows, stdout):
    for name, cols in rows.items():
        assert cols[0] != "FAILED", f"{name}: {' '.join(cols)}"
        wgmma, smem_kb, regs = int(cols[0]), float(cols[3]), int(cols[4])
        spill_st, spill_ld = (int(x) for x in cols[5].split("/"))
        assert wgmma > 0, f"{name}: no wgmma (not compiled for Hopper's tensor cores)"
        assert 2 * (smem_kb + 1) <= SM_SHARED_KB, f"{name}: {smem_kb} KB of shared memory, one program per SM"
        # 4 warps at ptxas's ceiling of 255 registers still fit twice (the register file holds 64K); what the
        # ceiling costs shows as spills, bounded here by what the measured configs spill.
        assert regs > 0, f"{name}: ptxas did not assemble it:\n{stdout}"
        assert max(spill_st, spill_ld) <= SPILL_BYTES, f"{name}: spills {cols[5]} bytes"
        assert cols[7] == "no", f"{name}: ptxas serialized the wgmmas (C7514)"


def test_default_programs_compile_for_sm90_and_fit_twice_per_sm():
    from prefix_attn.triton.config import CONFIGS

    cfg = CONFIGS["cuda_16bit"]
    assert (cfg.fwd_block_m, cfg.fwd_block_n, cfg.fwd_warps, cfg.fwd_stages) == (16, 64, 4, 3)
    assert (cfg.kv_block_m, cfg.kv_block_n, cfg.kv_warps, cfg.kv_stages) == (64, 64, 4, 2)
    assert (cfg.dq_block_m, cfg.dq_block_n, cfg.dq_warps, cfg.dq_stages) == (16, 64, 4, 2)
    _fits_twice(*_compile(tuple(DEFAULTS)))


def test_gluon_backward_compiles_for_sm90_fits_twice_and_overlaps_the_softmax():
    """The Gluon kernels compile with the Triton installed, fit twice per SM like the plain ones, and do what they are
    for: exponentials issued while a wgmma is in flight (the plain kernels' ex2@mma is 0)."""
    from prefix_attn.triton import backward_gluon
    from prefix_attn.triton.config import CONFIGS

    if not backward_gluon.available():
        pytest.skip("this Triton has no Gluon API of the kind backward_gluon is written against")
    assert CONFIGS["cuda_16bit"].bwd_gluon
    rows, stdout = _compile(tuple(GLUON))
    _fits_twice(rows, stdout)
    for name, cols in rows.items():
        assert int(cols[6]) > 0, f"{name}: no exponential runs under an MMA"
    plain, _ = _compile(tuple(DEFAULTS))
    assert all(int(plain[name][6]) == 0 for name in DEFAULTS[1:]), "the plain backward's softmax now overlaps an MMA"
