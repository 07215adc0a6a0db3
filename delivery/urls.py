"""URLs of the app developers' delivery status pages, mounted at status/."""

from django.urls import path, register_converter

from destinations.models import Stage

from .status import views


class StageConverter:
    """A stage exactly as stored (TEST, PROD); anything else matches no URL."""

    regex = "|".join(Stage.values)

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return str(value)


register_converter(StageConverter, "stage")

app_name = "status"

SCOPE = "<slug:application>/<stage:stage>/"
DESTINATION = SCOPE + "destinations/<int:destination>/"

urlpatterns = [
    path("", views.home, name="home"),
    path(
        "<slug:application>/notifications/",
        views.notification_settings,
        name="notifications",
    ),
    path(SCOPE, views.overview, name="overview"),
    path(DESTINATION, views.destination_detail, name="destination"),
    path(DESTINATION + "test-event/", views.send_test, name="send-test"),
    path(DESTINATION + "replay/", views.replay_request, name="replay"),
    path(
        SCOPE + "replays/<int:replay_id>/",
        views.replay_progress,
        name="replay-progress",
    ),
    path(SCOPE + "events/", views.event_search, name="events"),
    path(SCOPE + "events/<str:event_id>/", views.event_detail, name="event"),
    path(
        SCOPE + "deliveries/<int:delivery>/retry/",
        views.retry_delivery,
        name="retry",
    ),
]
