from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponseRedirect
from django.shortcuts import redirect
from django.urls import include, path

from .login_protection import LockoutAdminAuthenticationForm, LockoutAuthenticationForm

admin.site.login_form = LockoutAdminAuthenticationForm


def home(request: HttpRequest) -> HttpResponseRedirect:
    """Send Partner staff to the admin and everyone else to the status pages."""
    if request.user.is_authenticated and request.user.is_staff:
        return redirect("admin:index")
    return redirect("status:home")


urlpatterns = [
    path("", home, name="root"),
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
