"""Default config: the real garbage dataset, pretrained ResNet50 + DistilBERT, one GPU node.

      python -m jaxmm.train --config configs/default.py --workdir runs/default \
          --config.data_dir=/path/to/garbage_data

Pretrained weights and the tokenizer are read from local folders (compute nodes are often
offline); fetch them once on a login node with ``python -m jaxmm.download_weights --out weights``.
"""

import ml_collections


def get_config():
    """Returns the default training configuration."""
    c = ml_collections.ConfigDict()

    # --- Data -----------------------------------------------------------------------------------
    c.data_dir = ""  # Root of CVPR_2024_dataset_{Train,Val,Test}/<Class>/<files>. Required.
    c.prepared_dir = ""  # Where `jaxmm.prepare` writes; "" = <data_dir>/jaxmm_prepared.
    c.class_names = ()  # () = the sorted class folders of the Train split.
    c.text_source = "filename"  # "filename" | "caption" | "both" (captions need the CSVs).
    c.stored_image_size = 256  # Shorter side the prepared records are stored at (pixels).
    c.exif_transpose = True  # Turn images upright by their EXIF orientation tag (phone photos).
    c.image_size = 224  # Crop fed to the model (pixels).
    c.max_text_length = 32  # Tokens per text, padded/truncated; texts are 1-10 words.
    c.tokenizer = "weights/distilbert"  # HF tokenizer folder (or cached hub id); "" = train one.
    c.tokenizer_vocab_size = 1000  # Only used when tokenizer == "" (a WordPiece trained on Train).
    c.color_jitter = 0.0  # Strength of brightness/contrast/saturation jitter in training; 0 = off.
    c.num_workers = 4  # Grain worker processes for the training pipeline; 0 = in-process.
    # CSV of Train examples to train without (a `file` column as in the audit's
    # label_issues.csv; rows whose optional `keep` column is 1/true are kept; rows of Val/Test
    # are ignored). "" = all of Train. The data is never changed; the run records the file's
    # SHA-256, and a resume with another list is refused like a data change.
    c.exclude_file = ""

    # Synthetic look-alike data (for demos and tests); generated into data_dir when enabled.
    c.demo = ml_collections.ConfigDict()
    c.demo.enabled = False  # Generate data_dir with `jaxmm.data.synthetic` if it holds no dataset.
    c.demo.per_class = 40  # Train images per class before the class imbalance is applied.
    c.demo.max_side = 256  # Largest image side of the generated files (pixels).
    c.demo.seed = 0  # Seed of the generated dataset.

    # --- Model ----------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.modalities = ("image", "text")  # Towers to use; ("text",) = text-only ablation.
    c.model.image_arch = "resnet50"  # "resnet50" | "tiny" (for tests and the demo).
    c.model.image_pretrained = "weights/resnet50"  # HF folder, torchvision .safetensors or "".
    c.model.text_arch = "distilbert"  # "distilbert" | "tiny".
    c.model.text_pretrained = "weights/distilbert"  # HF folder (or cached hub id) or "".
    c.model.text_pooling = "cls"  # "cls" | "mean" (masked mean over tokens).
    c.model.fusion = "concat"  # "concat" (projection + LayerNorm + concat -> MLP) | "gated".
    c.model.proj_dim = 512  # Per-tower projection width.
    c.model.hidden_dim = 512  # Hidden width of the fusion MLP.
    c.model.dropout = 0.3  # Dropout in the fusion head.
    c.model.modality_dropout = 0.1  # Per-example chance of dropping one tower while training.
    c.model.dtype = "float32"  # Compute dtype ("bfloat16" on GPUs); parameters stay float32.
    c.model.freeze_image = False  # Keep the image tower (weights and BatchNorm stats) fixed.
    c.model.freeze_text = False  # Keep the text tower fixed.
    # BatchNorm of the image tower in training: "flax" (flax.linen.BatchNorm, autodiffed) or
    # "fused" (a hand-written backward with the ReLU and residual add; same variables and
    # results, inference unchanged; prepared for GPUs, see docs/benchmarks.md).
    c.model.batchnorm = "flax"
    # The image tower's 7x7 stride-2 stem convolution in training: "conv" as written, or
    # "space_to_depth" (the same convolution and parameter computed as a 4x4 stride-1 one over
    # 2x2 pixel blocks: 12 input channels instead of 3; prepared for GPUs, docs/model.md).
    c.model.stem = "conv"
    # Text self-attention in training: "transformers" (DistilBERT's as written) or "fused" (one
    # query/key/value projection and jax.nn.dot_product_attention: cuDNN's fused kernel on GPUs
    # in bf16). "fused" has no attention dropout: a change of the math (docs/model.md).
    c.model.attention = "transformers"

    # --- Optimisation ---------------------------------------------------------------------------
    c.batch_size = 64  # Global batch, split over all devices of all processes.
    c.eval_batch_size = 128  # Global evaluation batch; the last batch is padded and masked.
    c.num_epochs = 10  # Upper bound; early stopping usually ends sooner (best epochs are 3-7).
    c.seed = 0  # Root of every random choice (init, shuffling, augmentation, dropout).
    # How dropout and modality-dropout masks are drawn: "per_example" (from each example's index
    # in the global batch: the same run on 1 or 64 devices) or "per_device" (one key per device,
    # as runs recorded without this field did; only to resume such a run exactly).
    c.rng_scheme = "per_example"
    c.optim = ml_collections.ConfigDict()
    c.optim.lr_image = 3e-5  # Peak learning rate of the image tower.
    c.optim.lr_text = 3e-5  # Peak learning rate of the text tower.
    c.optim.lr_head = 1e-3  # Peak learning rate of the fusion head.
    c.optim.warmup_epochs = 0.5  # Linear warm-up, then cosine decay to final_lr_fraction * peak.
    c.optim.final_lr_fraction = 0.01  # Learning rate at the last step, relative to the peak.
    c.optim.weight_decay = 0.01  # AdamW decay; never applied to biases and norm scales.
    c.optim.grad_clip_norm = 1.0  # Global gradient-norm clip; 0 = off.
    c.optim.label_smoothing = 0.0  # Label smoothing of the cross-entropy.
    # "balanced" (N / (K * n_k) from Train), "none", or one weight per class in class order as
    # a string of numbers: "1.2,0.6,1.3,1.5" (--config.class_weights=1.2,0.6,1.3,1.5).
    c.class_weights = "balanced"
    c.accumulate_steps = 1  # Micro-batches per step: each device's rows of batch_size are run in
    # this many pieces (less activation memory; the loss over the whole batch is unchanged).
    # Which devices share BatchNorm batch statistics in training: "global" (all devices: the
    # run is the same whatever the device count), "device" (each device normalises over its own
    # rows, so results depend on the rows per device) or "group:N" (N consecutive devices, N
    # dividing the device count; "group:8" = one 8-GPU node). Inference always uses the running
    # averages. Costs and advice per cluster: docs/scaling.md.
    c.batchnorm_sync = "global"
    c.ema_decay = 0.0  # > 0: keep an EMA of the weights; validation and the best checkpoint use it.
    c.init_from = ""  # Warm start: "WORKDIR[:best|latest|STEP]"; weights + BatchNorm stats only.

    # --- Evaluation, checkpoints, logging -------------------------------------------------------
    c.early_stopping_metric = "macro_f1"  # Validation metric that picks the best checkpoint.
    c.exclude_test_duplicates = False  # Evaluate also scores test without its copies of Train.
    # Temperature scaling fitted on validation at the end of training: "trusted" applies it only
    # when it passes the trust criterion (>= 50 examples, not at a search bound, a held-out NLL
    # gain; docs/evaluation.md), "always" applies any fit, "off" fits none.
    c.calibration = "trusted"
    c.patience = 3  # Epochs without improvement before stopping; 0 = never stop early.
    c.checkpoint_every_steps = 200  # Also saved at every epoch end and on SIGTERM/SIGUSR1.
    c.keep_checkpoints = 2  # Latest checkpoints kept, at least 1 (the best one is separate).
    c.resume_step = -1  # Kept step to resume from; -1 = newest readable (older on failure).
    c.allow_data_change = False  # Resume even if the prepared data changed since the start.
    c.log_every_steps = 20  # Metrics are fetched from the devices only at these steps.
    c.log_every_seconds = 30.0  # Output not a terminal (Slurm logs): a progress line this often.
    c.signal_check_every_steps = 5  # Multi-process runs agree on a stop signal this often.
    c.prefetch_batches = 2  # Batches placed on the devices ahead of the step.
    # Draw batches and copy them to the devices in a background thread, overlapping the copy
    # with the steps (same batches in the same order, same results; docs/benchmarks.md).
    c.prefetch_thread = False
    # Experiment tracking (needs requirements-tracking.txt; docs/tracking.md). metrics.jsonl stays
    # the record of truth; a tracking failure is one warning and training goes on.
    c.tracking = ""  # "" = off, "mlflow", or "wandb" (offline, into <workdir>/wandb; sync later).
    c.tracking_uri = ""  # MLflow store; "" = sqlite:///<workdir's parent>/mlflow.db. The
    # MLFLOW_TRACKING_URI environment variable wins over both.
    c.tracking_experiment = "jaxmm"  # Experiment (W&B project) name; a sweep's runs use the
    # sweep folder's name instead.
    # Every whole-number field above is checked (>= 1, or >= 0 for patience, num_workers and
    # prefetch_batches) before any data is prepared (builders.validate_config).
    return c
