"""Named model shapes. ``tiny`` is the CPU teacher; the others are the published T5/GPT-2 sizes."""

from __future__ import annotations

from modjax.core.model_config import GPT2Config, T5Config

_T5_V1_1 = dict(
  feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False
)

PRESETS: dict[str, T5Config | GPT2Config] = {
  # For tests: seconds per run on one CPU core.
  "micro": T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2,
                    num_decoder_layers=2, relative_attention_num_buckets=8,
                    relative_attention_max_distance=32, dropout_rate=0.0),
    # A small T5 for CPU: trains from scratch in minutes; the vocabulary is set by the data.
    "tiny": T5Config(vocab_size=1024, d_model=128, d_kv=32, d_ff=512, num_heads=4, num_layers=4,
                     num_decoder_layers=4, relative_attention_num_buckets=16,
                     relative_attention_max_distance=64, dropout_rate=0.0),
    # The CPU teacher for the ddtp-summ run (and the compression issue).
    "small-cpu": T5Config(vocab_size=8000, d_model=256, d_kv=64, d_ff=1024, num_heads=4,
                        num_layers=4, num_decoder_layers=4, dropout_rate=0.0),
    # The 6+6-layer CPU teacher that Modular Transformers distils on ddtp-summ (L=6: {2,3,6}).
    "small-cpu-6": T5Config(vocab_size=8000, d_model=256, d_kv=64, d_ff=1024, num_heads=4,
                          num_layers=6, num_decoder_layers=6, dropout_rate=0.0),
    "t5-small": T5Config(d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=6, num_decoder_layers=6),
    "t5-base": T5Config(d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_layers=12, num_decoder_layers=12),
    "t5-large": T5Config(d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_layers=24, num_decoder_layers=24),
    "t5-v1_1-small": T5Config(d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8,
                              num_decoder_layers=8, **_T5_V1_1),
    "t5-v1_1-base": T5Config(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12,
                             num_decoder_layers=12, **_T5_V1_1),
    "gpt2": GPT2Config(),
    "gpt2-tiny": GPT2Config(vocab_size=1024, n_positions=256, n_embd=128, n_layer=4, n_head=4),
    # A GPT-2-shaped LM for CPU experiments (FFN merging on ddtp-summ descriptions): 6 layers.
    "gpt2-small-cpu": GPT2Config(vocab_size=4096, n_positions=256, n_embd=256, n_layer=6,
                                 n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}  # fmt: skip


def get_preset(name: str) -> T5Config | GPT2Config:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]
