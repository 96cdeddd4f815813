"""The time-to-dense-quality study: how much sooner does Lighthouse pretraining followed by a
dense recovery reach the quality of dense training? `run.py` runs it (in the background, on one
GPU), `analyze.py` turns the committed per-run JSONs into the metrics, verdicts and the headline,
`stats.py` holds the arithmetic and `corpus.py` the read-once data. See README.md."""
