"""Fine-tune a T5 on a standard task. The arg is ``<task>,<size>``:

  task: cnn_dailymail | xsum | squad_question_generation | wmt14_ende
  size: t5-small | t5-base | t5-large | t5-v1_1-small | t5-v1_1-base

Real runs start from a converted Hugging Face checkpoint and T5's SentencePiece model (both local
or gs://; nothing is downloaded at run time) and read TFDS data prepared in ``data.tfds_data_dir``:

  python -m modjax.train --config configs/t5_finetune.py:cnn_dailymail,t5-base \\
      --config.workdir=gs://BUCKET/runs/cnndm-t5-base \\
      --config.model.init_from=/path/to/t5-base  # a save_pretrained directory \\
      --config.data.vocab_path=/path/to/spiece.model \\
      --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets
  python -m modjax.evaluate --config configs/t5_finetune.py:cnn_dailymail,t5-base \\
      --config.workdir=gs://BUCKET/runs/cnndm-t5-base --config.data.vocab_path=...

Without ``model.init_from`` the preset of that size is trained from scratch.
"""

from modjax.train.defaults import base_config, lock

# (inputs_length, targets_length, eval metric, beams) per task, as T5's fine-tuning used them.
TASKS = {
  "cnn_dailymail": (512, 128, "rouge", 4),
  "xsum": (512, 64, "rouge", 4),
  "squad_question_generation": (512, 32, "rouge,bleu", 4),
  "wmt14_ende": (256, 256, "bleu", 4),
}
# (global batch, microbatches, mesh.fsdp) per size, for a v3-8 / 8-GPU host.
SIZES = {
  "t5-small": (128, 1, 1),
  "t5-base": (128, 1, 1),
  "t5-large": (128, 2, 8),
  "t5-v1_1-small": (128, 1, 1),
  "t5-v1_1-base": (128, 1, 1),
}


def get_config(arg: str = "cnn_dailymail,t5-small"):
  task, _, size = arg.partition(",")
  size = size or "t5-small"
  if task not in TASKS:
    raise ValueError(
      f"unknown task {task!r} in configs/t5_finetune.py:{arg}; choose one of {sorted(TASKS)}"
    )
  if size not in SIZES:
    raise ValueError(
      f"unknown size {size!r} in configs/t5_finetune.py:{arg}; choose one of {sorted(SIZES)}"
    )
  inputs_length, targets_length, metric, beams = TASKS[task]
  batch, microbatches, fsdp = SIZES[size]
  c = base_config()
  c.model.preset = size
  c.model.dropout_rate = 0.1
  c.data.task = task
  c.data.extra_ids = 100
  c.data.expected_vocab_size = 32100  # T5's SentencePiece model plus 100 sentinels
  c.data.inputs_length = inputs_length
  c.data.targets_length = targets_length
  c.data.pack = True
  c.data.host_split = "source"
  c.train.batch_size = batch
  c.train.num_microbatches = microbatches
  c.train.num_steps = 50_000
  c.train.log_every = 100
  c.optimizer.name = "adafactor"  # T5's fine-tuning recipe: Adafactor, constant 1e-3
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.mesh.fsdp = fsdp
  c.checkpoint.every_steps = 1000
  c.eval.batch_size = 64
  c.eval.max_examples = 0
  c.eval.num_beams = beams
  c.eval.max_new_tokens = targets_length
  c.eval.metrics = metric
  return lock(c)
