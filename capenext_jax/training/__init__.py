"""Training machinery: schedule, frozen/trainable split and sharding, steps, checkpoints.

How a train loop wires them (train.py owns the loop; nothing here reads flags):

  tx = schedule.make_optimizer(config.optim, steps_per_epoch)
  graphdef, st = state.init_train_state(model, tx, jax.random.PRNGKey(config.seed))
  mesh = partition.make_mesh(config.mesh_shape)                   # {'data': -1, 'fsdp': 1}
  shardings = state.state_shardings(st, tx, mesh, config.sharding_rules)
  st = jax.device_put(st, shardings)
  ckpt = checkpoint.Checkpointer(workdir, keep_last=3, best_metric='pck')
  if ckpt.latest_step() is not None:
    st, position = ckpt.restore(state.abstract_state(st, shardings).replace(frozen=st.frozen))
  train_step = step.make_train_step(graphdef, loss_fn, tx, shardings=shardings)
  stop = checkpoint.StopSignal()
  with jax.set_mesh(mesh):
    for i in range(first_step, total_steps):
      if stop.should_stop(i):
        ckpt.save(i, st, position, force=True); ckpt.wait(); return
      st, metrics = train_step(st, partition.shard_batch(next(batches), mesh))
      history.append((i, metrics))                  # device arrays, no host sync
      if (i + 1) % log_every == 0:
        history = jax.device_get(history); step.check_finite(history); ...; history = []
"""
