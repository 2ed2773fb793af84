from django.apps import AppConfig


class AdapterRegistryConfig(AppConfig):
    name = "webapp.adapter_registry"
    label = "adapter_registry"
    verbose_name = "Model registry (adapters)"
