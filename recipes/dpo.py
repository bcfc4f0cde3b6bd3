"""DPO with prefix sharing and packing: the `accelerate launch` entry point.

    accelerate launch --config_file recipes/accelerate/<topology>.yaml recipes/dpo.py --config configs/<run>.yaml \
        [--any_field value ...]

<topology> is single_gpu, ddp, fsdp2 or zero3 (each file says what it trades). The YAML sets the dataset, the training
(prefixdpo.PrefixDPOConfig = trl.DPOConfig + prefix sharing) and the model (trl.ModelConfig, LoRA included); flags
after it override single fields. It is the run `prefixdpo train` makes in one process (prefixdpo/run.py):

    parse -> check output_dir, model and data -> tokenizer -> data -> trainer (loads the model) -> train -> save

A mistake in the config or the data ends in one `error:` line and exit status 2. The first SIGTERM or SIGINT saves a
checkpoint after the current step on every process and exits with status 0; resume_from_checkpoint: true continues.
"""

import logging
import sys

from prefixdpo.run import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(prog="recipes/dpo.py"))
