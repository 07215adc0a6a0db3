"""Django's own user and group admins, with this project's change list."""

from django.contrib import admin
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User

from .changelists import SafeChangeListMixin

admin.site.unregister(User)
admin.site.unregister(Group)


@admin.register(User)
class PortalUserAdmin(SafeChangeListMixin, UserAdmin):
    pass


@admin.register(Group)
class PortalGroupAdmin(SafeChangeListMixin, GroupAdmin):
    pass
