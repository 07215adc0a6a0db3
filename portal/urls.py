from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView

from .login_protection import LockoutAdminAuthenticationForm, LockoutAuthenticationForm

admin.site.login_form = LockoutAdminAuthenticationForm

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index", permanent=False)),
    path("admin/", admin.site.urls),
    path("status/", include("delivery.urls")),
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(
            template_name="status/login.html",
            authentication_form=LockoutAuthenticationForm,
            redirect_authenticated_user=True,
        ),
        name="login",
    ),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]
