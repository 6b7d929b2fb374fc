from django.apps import AppConfig


class ThirdPartyConfig(AppConfig):
    """Models whose related managers come from django-taggit and django-modelcluster."""

    name = "tests.thirdparty"
    label = "thirdparty"
