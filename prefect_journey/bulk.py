"""Deprecated: many images per task run is :mod:`prefect_journey.campaigns.chunked`."""

from prefect_journey.deprecations import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "RECOMMENDED_IMAGES_PER_TASK_RUN": (
            "prefect_journey.campaigns.chunked:RECOMMENDED_IMAGES_PER_TASK_RUN"
        ),
        "SharedRun": "prefect_journey.campaigns.chunked:SharedRun",
        "imagine_and_store_chunk": "prefect_journey.campaigns.chunked:imagine_and_store_chunk",
    },
)
