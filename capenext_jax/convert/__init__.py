"""Weights in other layouts <-> our params pure dicts, and the capenext-convert program.

  torch_io.py     safe readers of .pth / .npz / .safetensors (no pickled code runs)
  entries.py      entry tables (name, path, layout kind) of the Swin V2 / ViT converters
  swin.py         Swin V2 (official / Microsoft) <-> ours
  clip.py         CLIP (OpenAI / Hugging Face) <-> ours
  head.py         the CapeNext head and fusion <-> ours
  conv_nets.py    conv + BatchNorm name and layout mapping (ResNet, HRNet)
  resnet.py       torchvision ResNet <-> ours
  hrnet.py        mmpose / ImageNet HRNet <-> ours
  vit.py          timm / DINOv2 / transformers ViT <-> ours
  backbones.py    per-architecture converters: official group, release loader
  official.py     the official CapeNext state dict <-> our params, fixture configs
  pretrained.py   init_from_pretrained: public backbone / CLIP releases into a model
  cli.py          capenext-convert: any source -> export (provenance) / official
"""
