"""vmqueue's core: what the producer and the workers share.

The contract (``models``, ``options``, ``images``, ``sshkeys``), the job store (``jobstore``), settings
(``settings``), Redis key and queue names (``keys``), the one Celery configuration
(``celery_config``) and the sweep request/report (``sweep``). It imports neither ``producer`` nor
``workers``.
"""
