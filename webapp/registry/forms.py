"""The register-a-model form: bounds and shapes; services.model_register judges the rest."""

from django import forms


class ModelRegisterForm(forms.Form):
    team = forms.ModelChoiceField(
        queryset=None, empty_label=None, help_text="Whose model it is: only this team sees it."
    )
    name = forms.CharField(
        max_length=100,
        help_text="What runs, the API and the CLI call it: lower-case letters, digits, '.', "
        "'_' and '-', e.g. qwen2.5-0.5b.",
    )
    title = forms.CharField(max_length=200, required=False, help_text="Optional, for people.")
    path = forms.CharField(
        label="Local directory",
        max_length=1000,
        required=False,
        help_text="A directory in Hugging Face layout (config.json, *.safetensors, tokenizer) "
        "under an allowed root; a relative path is under the first root.",
    )
    hub = forms.CharField(
        label="…or Hub id@revision",
        max_length=200,
        required=False,
        help_text="E.g. Qwen/Qwen2.5-0.5B@main, or @<commit sha> to pin the weights. Offline, "
        "it must already be in the server's HF cache.",
    )

    def __init__(self, *args, teams, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = teams

    def clean(self):
        cleaned = super().clean()
        if bool(cleaned.get("path")) == bool(cleaned.get("hub")):
            raise forms.ValidationError("Give either a local directory or a Hub id@revision.")
        return cleaned

    def register_kwargs(self) -> dict:
        """The arguments of services.model_register, from the cleaned form."""
        data = self.cleaned_data
        fields = {key: data[key] for key in ("team", "name", "title")}
        return fields | {"path": data["path"].strip(), "hub": data["hub"].strip()}
