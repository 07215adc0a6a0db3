"""Clear key names that hold a pasted SharedAccessKey.

Before validation rejected it, a key pasted into SharedAccessKeyName was stored in
servicebus_key_name, a plain column that staff can filter on. The pages mask such a
value; this removes it. The encrypted connection string is left as it is.
"""

import re

from django.apps.registry import Apps
from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor

# 32 bytes in base64 without the padding, as destinations/access_keys.py defines it
# at the time of this migration.
KEY_RE = re.compile(r"[A-Za-z0-9+/]{43,}")


def clear_pasted_keys(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    Destination = apps.get_model("destinations", "Destination")
    named = Destination.objects.exclude(servicebus_key_name="")
    pasted = [
        pk
        for pk, name in named.values_list("pk", "servicebus_key_name")
        if KEY_RE.search(name)
    ]
    Destination.objects.filter(pk__in=pasted).update(servicebus_key_name="")


class Migration(migrations.Migration):
    dependencies = [("destinations", "0004_partner_staff_group")]

    operations = [
        migrations.RunPython(clear_pasted_keys, migrations.RunPython.noop),
    ]
