"""The device layer: how a model state lives on the mesh and how jitted steps run it.

Below everything that runs a model (training/, evaluation/, text/cache.py, loading.py) and
above the model and its data rules; nothing here reads configs, files or flags.

  partition.py   trainable filter, mesh, regex sharding rules (FSDP), batch sharding, gather,
                 to_host
  flat.py        the optimizer over a few large buffers (Layout: leaves grouped by dtype and
                 sharding, local under FSDP), per-leaf conversion for checkpoints
  state.py       TrainState (trainable / batch_stats / frozen / opt_state / step / rng), its
                 shardings, abstract (restore) targets
  step.py        jitted train and eval steps, generic over forward and loss; the evaluation
                 predict step (last layer's keypoints)
  forward.py     batch -> model call (cached text rows, device warp); DEVICE_KEYS
"""
