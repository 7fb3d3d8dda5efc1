"""The three ways in: ``http`` (``/scrape`` and ``/sd``), ``forward`` and ``tcp`` listeners,
each composing the pipeline in ``promgate.core`` and ``promgate.policy``."""
