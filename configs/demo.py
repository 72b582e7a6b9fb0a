"""Demo config: synthetic look-alike data and tiny towers; trains on 2 CPU cores in minutes.

      python -m jaxmm.train --config configs/demo.py --workdir runs/demo
      python -m jaxmm.evaluate --workdir runs/demo --split test

The dataset is generated on first use into ``data_dir`` (a cache folder) and prepared once.
"""

import os

from jaxmm.config_files import sibling


def get_config():
    """Returns the demo configuration (see configs/default.py for every field)."""
    c = sibling(__file__, "default")()
    cache = os.environ.get("JAXMM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxmm"))
    c.data_dir = os.path.join(cache, "demo_data")
    c.demo.enabled = True
    c.demo.per_class = 60
    c.demo.max_side = 256
    c.stored_image_size = 80
    c.image_size = 64
    c.max_text_length = 16
    c.tokenizer = ""  # Trains a small WordPiece tokenizer on the Train texts.
    c.tokenizer_vocab_size = 400
    c.num_workers = 0
    c.model.image_arch = "tiny"
    c.model.image_pretrained = ""
    c.model.text_arch = "tiny"
    c.model.text_pretrained = ""
    c.model.proj_dim = 64
    c.model.hidden_dim = 64
    c.model.dropout = 0.1
    c.batch_size = 16
    c.eval_batch_size = 32
    c.num_epochs = 10
    c.optim.lr_image = 2e-3
    c.optim.lr_text = 2e-3
    c.optim.lr_head = 2e-3
    c.optim.warmup_epochs = 0.3
    c.patience = 0
    c.checkpoint_every_steps = 20
    c.log_every_steps = 5
    return c
