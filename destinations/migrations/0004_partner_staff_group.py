"""Create the "Partner staff" group with what staff need to run the admin.

Partner staff manage applications and destinations, read events, deliveries and
attempts, and change deliveries only through the admin's retry action.
"""

from typing import Any

from django.contrib.auth.management import create_permissions
from django.db import migrations

GROUP_NAME = "Partner staff"

PERMISSIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "destinations": {
        "application": ("add", "change", "delete", "view"),
        "destination": ("add", "change", "delete", "view"),
    },
    "delivery": {
        "event": ("view",),
        "delivery": ("view", "change"),
        "attempt": ("view",),
    },
}


def create_group(apps: Any, schema_editor: Any) -> None:
    # Permissions are created after all migrations have run, so on a new database
    # they do not exist yet at this point: create them now.
    for app_label in PERMISSIONS:
        app_config = apps.get_app_config(app_label)
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None

    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name=GROUP_NAME)
    for app_label, models in PERMISSIONS.items():
        for model, actions in models.items():
            codenames = [f"{action}_{model}" for action in actions]
            permissions = Permission.objects.filter(
                content_type__app_label=app_label,
                content_type__model=model,
                codename__in=codenames,
            )
            found = set(permissions.values_list("codename", flat=True))
            missing = set(codenames) - found
            if missing:
                raise RuntimeError(
                    f"Permissions {sorted(missing)} of {app_label}.{model} do not "
                    "exist, so the Partner staff group cannot be created."
                )
            group.permissions.add(*permissions)


def delete_group(apps: Any, schema_editor: Any) -> None:
    apps.get_model("auth", "Group").objects.filter(name=GROUP_NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("destinations", "0003_delivery_engine"),
        ("delivery", "0002_delivery_engine"),
    ]

    operations = [migrations.RunPython(create_group, delete_group)]
