import os

from celery import Celery

from .broker import use_atomic_filesystem_broker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
use_atomic_filesystem_broker()

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
