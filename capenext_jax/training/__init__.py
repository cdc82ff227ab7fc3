"""Training: the loop and the machinery it wires (nothing here reads flags but program.py).

  loop.py        train_and_evaluate(config, workdir, data): steps, logging, validation,
                 checkpoints, preemption
  init.py        init_state(config, optimizer, mesh): the train state, created sharded;
                 build_train_step: the config's jitted step (no TensorFlow / clu import)
  prefetch.py    DevicePrefetch: batches read and placed on the mesh two steps ahead
  schedule.py    the official optimizer and learning-rate schedule
  checkpoint.py  orbax checkpoints of (state, data position), weights-only restore, the frozen
                 weights stored once per workdir, SIGTERM / Ctrl-C handling, a checkpoint of
                 another model config refused (not moved aside)
  workdir.py     WorkdirLock (one training per workdir), the resume-config check, never an
                 export / dataset
  run_config_checks.py  the run config's numbers checked before a run starts
  program.py     capenext-train / train.py: flags, the run's splits, train_and_evaluate

The state, its sharding and the jitted steps are the device layer's (capenext_jax/device/).
"""
