from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("destinations", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="destination",
            name="servicebus_max_message_size",
            field=models.PositiveIntegerField(
                default=262144,
                help_text=(
                    "256 KB on the Standard tier; on Premium, the entity's own maximum "
                    "(up to 100 MB)."
                ),
                verbose_name="maximum message size (bytes)",
            ),
        ),
    ]
