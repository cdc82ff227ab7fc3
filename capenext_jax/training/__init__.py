"""Training: the loop and the machinery it wires (nothing here reads flags).

  loop.py        train_and_evaluate(config, workdir, data): steps, logging, validation,
                 checkpoints, preemption; train.py builds `data` and calls it
  init.py        init_state(config, optimizer, mesh): the train state, created sharded
  state.py       TrainState (trainable / frozen / optimizer state / step / rng), shardings
  step.py        jitted train and eval steps, generic over forward and loss
  partition.py   trainable filter, mesh, regex sharding rules, batch sharding, host gather
  schedule.py    the official optimizer and learning-rate schedule
  checkpoint.py  orbax checkpoints of (state, data position), SIGTERM / Ctrl-C handling,
                 a checkpoint of another model config refused (not moved aside)
  workdir.py     one training per workdir (lock), resume-config check, never an export / dataset
  run_config_checks.py  the run config's numbers checked before a run starts
"""
