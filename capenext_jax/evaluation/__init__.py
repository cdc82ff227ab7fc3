"""The official MP-100 evaluation: pairs and protocol, the Evaluator, predictions files,
reports and overlays.

  pairs.py        EvalProtocol, EvalPairs (drawn once), episode export, predictions scoring
  evaluator.py    Evaluator(graphdef, data, protocol, mesh).run(state) -> scores
  predictions.py  the predictions file format (write, read, align, score)
  report.py       the per-category table and the JSON report
  visualize.py    overlays (prediction, ground truth, skeleton, legend)
"""
