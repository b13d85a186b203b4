"""Campaigns: hundreds of prompts, generated and stored under a budget and a concurrency limit.

- :mod:`~prefect_journey.campaigns.plan`: read and check the items (plain Python, no Prefect).
- :mod:`~prefect_journey.campaigns.pipeline`: an item's life, once, and the run around it;
  the report types.
- :mod:`~prefect_journey.campaigns.per_image`: executor 1, a task run per image.
- :mod:`~prefect_journey.campaigns.chunked`: executor 2, many images per task run.

The flows are :func:`prefect_journey.flows.batch_campaign` and its async twin; the report
types are also importable from :mod:`prefect_journey` itself.
"""
