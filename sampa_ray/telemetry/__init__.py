"""What a run tells the outside world while it runs: Prometheus metrics and their endpoint.

- :mod:`.metrics`: the metric families (:class:`~.metrics.RunMetrics`) and the probe an executor
  feeds them through (:class:`~.metrics.RoundProbe`)
- :mod:`.http`: the scrape endpoint (HTTP or HTTPS, loopback unless a bearer token guards it)
"""
