"""ImageNet (ILSVRC-2012), ViT-B/32 from scratch, any method: the big_vision GSAM recipe, bfloat16.

  python -m gmix_jax.main --config=configs/imagenet_vit.py:gsam --workdir=workdirs/imagenet_vit_gsam \\
      --config.dataset.data_dir=/path/to/tensorflow_datasets

The part after ``:`` is a method preset (gmix_jax.objectives.PRESETS), as in
configs/imagenet.py. Other sizes: ``--config.model.name=vit_b16`` (or vit_s16,
vit_ti16); class-token pooling: ``--config.model.kwargs.pool=tok``.

Recipe read from big_vision's ``big_vision/configs/proj/gsam/vit_i1k_gsam_no_aug.py``
(google-research/big_vision; GSAM, Zhuang et al. 2022, arXiv:2203.08065): ViT-B/32
with global-average pooling, 300 epochs, batch 4096, Inception crop to 224 px +
flip, Adam(W) with lr 0.003, gradient clipping at global norm 1.0, 10,000 warmup
steps (= 32 epochs at this batch), weight decay 0.3 x lr per step (big_vision's
wd = 0.001 is applied without the lr; here ``optimizer.weight_decay`` is
multiplied by the lr, so 0.3), GSAM with ρ following the learning rate from
0.6 down to 0.1 and α = 0.6. Sharpness presets other than GSAM keep the
library's ρ (0.05 for SAM). Differences, because the trainer has no such option
yet: big_vision decays the lr linearly to 1 %, here it is cosine; big_vision
trains with a sigmoid cross-entropy and head bias -10, here softmax
cross-entropy. bfloat16 compute (``model.dtype``) as big_vision on TPU.
``--config.accumulation_steps=K`` when a device cannot hold its share of the batch.

Expected results, for orientation only — published figures, not measured with
this library (no ImageNet run has been made):
  gsam  GSAM abstract (Zhuang et al. 2022): ViT-B/32 +3.2 top-1 over SAM and
        +5.4 over AdamW on ImageNet from scratch
  sam   ViT-B/16 with SAM 79.9 % top-1, Inception-style preprocessing, about +5.3
        over AdamW (Chen et al., ICLR 2022, "When Vision Transformers Outperform
        ResNets"); run it with --config.model.name=vit_b16
"""
from configs import common


def get_config(method: str = 'gsam'):
  c = common.base()
  common.imagenet_data(c)
  c.model.name = 'vit_b32'
  c.model.dtype = 'bfloat16'
  c.model.kwargs.pool = 'gap'
  c.method = common.method(method)
  if method == 'gsam':
    c.method.sharpness.rho = 0.6
    c.method.sharpness.rho_min = 0.1
    c.method.sharpness.rho_schedule = 'lr'
    c.method.sharpness.gsam_alpha = 0.6
  if method in ('bgmix', 'dgmix'):
    c.method.sensitivity.chunk = 16
  c.batch_size = 4096
  c.num_epochs = 300
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 0.003
  c.optimizer.weight_decay = 0.3
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_epochs = 32.0         # big_vision: 10,000 steps of 4096 (1.28 M images)
  c.optimizer.grad_clip = 1.0
  c.eval_batch_size = 1000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c
