from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView

from .login_protection import LockoutAdminAuthenticationForm, LockoutAuthenticationForm

admin.site.login_form = LockoutAdminAuthenticationForm

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index", permanent=False)),
    path("admin/", admin.site.urls),
]
