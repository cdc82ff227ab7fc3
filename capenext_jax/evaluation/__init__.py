"""The official MP-100 evaluation: pairs and protocol, the Evaluator, predictions files,
reports and overlays.

  pairs.py        EvalProtocol, EvalPairs (drawn once), episode export, predictions scoring
  evaluator.py    Evaluator(predict_fn, data, protocol, mesh).run(state) -> scores
  predict_fn.py   predict_fn: the jitted predict step with a split's text cache
  predictions.py  the predictions file format (write, read, align, score)
  report.py       the per-category table and the JSON report
  visualize.py    overlays (prediction, ground truth, skeleton, legend)
  program.py      capenext-eval / eval.py: flags, protocol and files, the report
"""
