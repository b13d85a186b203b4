"""Deprecated: what the flows shared is split by concern (publishing, credentials,
destinations, tasks, gate, campaigns.per_image)."""

from prefect_journey.deprecations import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "DEFAULT_DESTINATION": "prefect_journey.settings:DEFAULT_DESTINATION",
        "SCHEDULED_DATE": "prefect_journey.tasks:SCHEDULED_DATE",
        "browser_url": "prefect_journey.publishing:browser_url",
        "concurrency_limit_exists": "prefect_journey.gate:concurrency_limit_exists",
        "emit_stored_event": "prefect_journey.publishing:emit_stored_event",
        "image_artifact": "prefect_journey.publishing:image_artifact",
        "image_row": "prefect_journey.publishing:image_row",
        "load_credentials": "prefect_journey.credentials:load_credentials",
        "load_destination": "prefect_journey.destinations:load_destination",
        "make_task_runner": "prefect_journey.campaigns.per_image:make_task_runner",
        "publish_summary": "prefect_journey.publishing:publish_summary",
        "report_image": "prefect_journey.publishing:report_image",
        "resolve_variant": "prefect_journey.tasks:resolve_variant",
        "summary_table": "prefect_journey.publishing:summary_table",
    },
)
