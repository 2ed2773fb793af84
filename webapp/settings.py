"""PEFT Lab settings: every value comes from the environment, read here and nowhere else.

With no environment set, the app runs embedded: SQLite and Celery's filesystem
transport under ``var/``. ``DATABASE_URL=postgres://…`` and
``CELERY_BROKER_URL=redis://…`` switch to the real services.
"""

import math
import os
import re
import secrets
from datetime import timedelta
from pathlib import Path

import dj_database_url
import plotly
from csp.constants import NONE, SELF, UNSAFE_INLINE
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be ≥ {minimum}")
    return value


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


_BYTE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_BYTE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def env_bytes(name: str, default: str, *, minimum: int = 1) -> int:
    """A size in bytes, written as 2GB, 500MiB or 1048576."""
    raw = env_str(name, default) or default
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", raw)
    if not match or match[2].upper() not in _BYTE_UNITS:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a size (e.g. 2GB, 500MiB, 1048576)")
    value = int(match[1]) * _BYTE_UNITS[match[2].upper()]
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r} must be at least {minimum} bytes")
    return value


VAR_DIR = Path(env_str("PEFTLAB_VAR_DIR", str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)
# Where the web server listens (bin/serve, the demo banner of bootstrap_demo).
BIND_ADDRESS = env_str("PEFTLAB_BIND", "127.0.0.1:8000")
MODEL_CACHE_DIR = Path(env_str("PEFTLAB_CACHE_DIR", str(BASE_DIR / "var" / "cache"))).resolve()
# The only directories a team's own model may be registered from (comma-separated); a path, or
# a symlink inside one, that leaves them is refused. Relative entries are under the project.
MODEL_ROOTS = [
    (BASE_DIR / root).resolve() for root in env_list("PEFTLAB_MODEL_ROOTS", "var/models") if root
]
# The one shared Hugging Face cache that Hub ids resolve in (HF_HUB_CACHE, else HF_HOME/hub).
HF_HUB_CACHE = Path(
    env_str(
        "HF_HUB_CACHE",
        str(Path(env_str("HF_HOME", str(Path.home() / ".cache" / "huggingface"))) / "hub"),
    )
).resolve()


def load_secret_key() -> str:
    """The env value, else one generated on first start and kept in var/ (never a fixed default)."""
    key = os.environ.get("DJANGO_SECRET_KEY")
    if key:
        return key
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = load_secret_key()
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "template_partials",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "csp",
    "axes",
    "webapp.accounts",
    "webapp.experiments",
    "webapp.registry",
    "webapp.adapter_registry",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "csp.middleware.CSPMiddleware",
    "axes.middleware.AxesMiddleware",  # last: turns a lockout into the 429 page
]

ROOT_URLCONF = "webapp.urls"
WSGI_APPLICATION = "webapp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


SQLITE_PATH = Path(env_str("PEFTLAB_SQLITE_PATH", str(VAR_DIR / "peftlab.sqlite3")))


def database_config() -> dict:
    url = os.environ.get("DATABASE_URL")
    if url:
        config = dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True)
        config.setdefault("TEST", {})
        return config
    # SQLite is shared by the web process and the worker: WAL lets readers run beside
    # the worker's writes, IMMEDIATE transactions avoid "database is locked" upgrades.
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": SQLITE_PATH,
        "OPTIONS": {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
        # A file, not :memory:, so that a real worker process in the tests sees the test data.
        "TEST": {"NAME": str(VAR_DIR / "test.sqlite3")},
    }


DATABASES = {"default": database_config()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "runs"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
# plotly.js comes from the plotly package and htmx from django-htmx: our own static files,
# never a CDN, so pages work on an air-gapped network.
STATICFILES_DIRS = [
    BASE_DIR / "webapp" / "static",
    ("plotly", Path(plotly.__file__).parent / "package_data"),
]
# PEFTLAB_STATIC_COLLECTED=1 once `manage.py collectstatic` fills STATIC_ROOT with this setting
# on (bin/serve and compose's web service do): each file is then also stored under a name that
# carries its content's hash, with a .gz beside it, and pages link those names, so browsers
# keep them a year without asking again (whitenoise sends them gzipped and `immutable`; in
# compose nginx serves them). Unset (tests, a bare runserver): served from the finders with
# no collectstatic step, uncompressed, cached 60 s.
STATIC_COLLECTED = env_bool("PEFTLAB_STATIC_COLLECTED", False)
WHITENOISE_USE_FINDERS = not STATIC_COLLECTED
WHITENOISE_AUTOREFRESH = DEBUG

# ---- security ------------------------------------------------------------------------------
# PEFTLAB_HTTPS=1 when the site is served over TLS: cookies travel only over HTTPS, plain HTTP
# redirects, and HSTS tells browsers never to try HTTP again. Off by default so that
# `make run` works on http://localhost.
HTTPS = env_bool("PEFTLAB_HTTPS", False)
SECURE_SSL_REDIRECT = HTTPS
SECURE_REDIRECT_EXEMPT = [r"^health/$"]  # the container's health check calls plain HTTP
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_HSTS_SECONDS = env_int("PEFTLAB_HSTS_SECONDS", 365 * 24 * 3600 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("PEFTLAB_HSTS_INCLUDE_SUBDOMAINS", True)
# Preloading is hard to undo (browsers ship the list), so it is the operator's explicit choice;
# without it, check --deploy's reminder (W021) is silenced on purpose.
SECURE_HSTS_PRELOAD = env_bool("PEFTLAB_HSTS_PRELOAD", False)
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
# Behind a proxy (deploy/nginx.conf in docker-compose.yml), which must set X-Forwarded-Proto and
# X-Forwarded-For, replacing a client's own: the scheme and the client's address are then read
# from them (webapp.http.client_ip), so login throttling and the audit log see the client, not
# the proxy. Never set it where clients reach gunicorn directly: they could forge both.
BEHIND_PROXY = env_bool("PEFTLAB_BEHIND_PROXY", False)
if BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads it to send X-CSRFToken

# Content-Security-Policy: scripts only from our own static files (plotly.js, htmx, js/*.js),
# never inline, and no eval: htmx runs with allowEval off (base.html) and plotly.js draws
# its SVG traces without it. The compare pages alone add 'unsafe-eval' for the WebGL
# parcoords chart (experiments.views.PLOTLY_WEBGL_CSP says why). Styles need
# 'unsafe-inline': plotly.js injects <style> elements, and the progress bars carry their
# width in a style attribute. An inline style cannot run code.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF, UNSAFE_INLINE],
        "img-src": [SELF, "data:", "blob:"],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

# Login rate limiting (django-axes), for the login page and POST /api/v1/auth/token/: after
# PEFTLAB_LOGIN_FAILURE_LIMIT refused passwords for one username from one address, that pair
# is answered 429 for PEFTLAB_LOGIN_COOLOFF_MINUTES; after PEFTLAB_LOGIN_ADDRESS_FAILURE_LIMIT
# failures from one address across usernames (a password spray), the whole address is. A
# refused bearer token counts as a failure of the name "(bearer token)" from its address
# (webapp.accounts.throttle). A success resets its pair's count. The counts live in the
# database, so every web process sees them.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: refuses a locked-out pair before the password
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("PEFTLAB_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("PEFTLAB_LOGIN_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
LOGIN_ADDRESS_FAILURE_LIMIT = env_int("PEFTLAB_LOGIN_ADDRESS_FAILURE_LIMIT", 20, minimum=1)
AXES_HANDLER = "webapp.accounts.throttle.PairAndAddressHandler"
AXES_CLIENT_IP_CALLABLE = "webapp.http.client_ip"
AXES_RESET_ON_SUCCESS = True
# Attempts during a lockout do not extend it: the cool-off ends when the page says it does.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_LOCKOUT_CALLABLE = "webapp.accounts.views.login_locked_out"
AXES_USERNAME_CALLABLE = "webapp.accounts.views.login_attempt_username"
AXES_DISABLE_ACCESS_LOG = True  # successful logins are already in the audit log
AXES_VERBOSE = False  # no start-up banner in every manage.py command

# Uploads: a dataset body over DATASET_MAX_BYTES is refused from its Content-Length, unread
# (413). An uploaded file over FILE_UPLOAD_MAX_MEMORY_SIZE is spilled by Django to a temporary
# file (FILE_UPLOAD_TEMP_DIR, the system's by default), and a dataset is parsed from there in one
# streaming pass, its rows written to the artifact store: the cap is a matter of disk (the
# upload and its rows, each up to the cap, while it is parsed), not memory. Non-file bodies
# (the API's JSON, form fields) hold at most DATA_UPLOAD_MAX_MEMORY_SIZE: a full metrics batch
# is ~1.5 MB.
DATASET_MAX_BYTES = env_int("PEFTLAB_DATASET_MAX_BYTES", 2 * 1024**3, minimum=1024)
DATASET_MAX_ROWS = env_int("PEFTLAB_DATASET_MAX_ROWS", 200_000, minimum=10)
DATA_UPLOAD_MAX_MEMORY_SIZE = 4 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = int(2.5 * 1024 * 1024)

# Metric keys: a run holds at most this many distinct ones (a batch that would pass it is
# refused whole, 400 naming the cap); a metrics query that names no keys answers this many
# keys' series per page, with a cursor to the next page.
METRIC_KEYS_PER_RUN = env_int("PEFTLAB_MAX_METRIC_KEYS_PER_RUN", 1000, minimum=1)
METRIC_KEYS_PER_PAGE = env_int("PEFTLAB_METRIC_KEYS_PER_PAGE", 50, minimum=1)

# Adapter uploads: checked in a separate, resource-limited process, killed after the timeout.
# A merged export still queued or building after this long (its worker died) is sent again
# when someone asks for it.
MERGED_EXPORT_STALE_S = env_int("PEFTLAB_MERGED_EXPORT_STALE_S", 3600, minimum=60)
# A merged export's weights are written in safetensors shards of at most this size, each
# stored as one file (save_pretrained's max_shard_size; a bigger single tensor gets its own).
MERGED_SHARD_SIZE = env_bytes("PEFTLAB_MERGED_SHARD_SIZE", "2GB", minimum=1024)
ADAPTER_MAX_BYTES = env_int("PEFTLAB_ADAPTER_MAX_BYTES", 512 * 1024 * 1024, minimum=1024)
ADAPTER_CHECK_TIMEOUT_S = env_int("PEFTLAB_ADAPTER_CHECK_TIMEOUT_S", 120, minimum=5)
# A file uploaded to a run trained elsewhere (POST /api/v1/runs/<id>/artifacts/, kind=file):
# spilled to a temporary file by Django, then streamed into the artifact store, never whole
# in memory. deploy/nginx.conf lets bodies of this size (and a little more) through there.
RUN_FILE_MAX_BYTES = env_bytes("PEFTLAB_RUN_FILE_MAX_BYTES", "2GiB", minimum=1024)

# Celery: it only carries run ids. The filesystem transport needs no service.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
BROKER_DIR = VAR_DIR / "broker"
if CELERY_BROKER_URL.startswith("filesystem://"):
    for sub in ("queue", "processed", "control"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "store_processed": False,
        "control_folder": str(BROKER_DIR / "control"),
    }
else:
    # Redis redelivers an unacked task after the visibility timeout: keep it above the
    # longest run so a long training is never started twice (the claim would refuse it anyway).
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": env_int("PEFTLAB_VISIBILITY_TIMEOUT_S", 48 * 3600, minimum=60)
    }
# Time limits: the soft one raises inside the run (it fails as "time limit"), the hard one
# kills the process a little later (the reaper then finds the run lost).
RUN_TIME_LIMIT_S = env_int("PEFTLAB_RUN_TIME_LIMIT_S", 24 * 3600, minimum=60)
CELERY_TASK_SOFT_TIME_LIMIT = RUN_TIME_LIMIT_S
CELERY_TASK_TIME_LIMIT = RUN_TIME_LIMIT_S + 300
if CELERY_BROKER_TRANSPORT_OPTIONS.get("visibility_timeout", math.inf) <= CELERY_TASK_TIME_LIMIT:
    raise ImproperlyConfigured(
        "PEFTLAB_VISIBILITY_TIMEOUT_S must exceed PEFTLAB_RUN_TIME_LIMIT_S + 300: otherwise "
        "Redis hands a run that is still training to a second worker"
    )
# A lost broker connection (Redis restarted) must not stop a training in progress.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_BROKER_CONNECTION_MAX_RETRIES = None  # keep reconnecting, however long it takes
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Tasks are routed by name (webapp.experiments.queue.QUEUES); a run goes to the queue of the
# class and device count it needs, gpu.<class>.x<devices> (queue.run_queue). Playground answers
# and merged exports have queues of their own, served by a worker of their own
# (`-Q playground,export`), so a question never waits behind a training.
CELERY_TASK_ROUTES = ("webapp.experiments.queue.route",)
CELERY_TASK_DEFAULT_QUEUE = "gpu.any.x1"
# What a training worker advertises (`manage.py worker_queues` turns it into its -Q list): its
# GPU class ("any": it takes only runs that ask for no class) and its device count, 0 meaning
# the GPUs torch sees, or 2 on a machine without any (torchrun runs gloo on CPU).
WORKER_GPU_CLASS = env_str("PEFTLAB_WORKER_GPU_CLASS", "any")
if not re.fullmatch(r"[a-z0-9-]{1,40}", WORKER_GPU_CLASS):
    raise ImproperlyConfigured("PEFTLAB_WORKER_GPU_CLASS must match [a-z0-9-]{1,40}")
WORKER_DEVICES = env_int("PEFTLAB_WORKER_DEVICES", 0)
if WORKER_DEVICES > 8:
    raise ImproperlyConfigured("PEFTLAB_WORKER_DEVICES must be 0 (detect) to 8")
# Quotas, judged by the launch (429 over them) and by the fair order (webapp.experiments.quotas):
# a team's queued runs, the devices its runs hold at once (more wait), a user's launches a minute.
TEAM_MAX_QUEUED = env_int("PEFTLAB_TEAM_MAX_QUEUED", 50, minimum=1)
TEAM_MAX_RUNNING = env_int("PEFTLAB_TEAM_MAX_RUNNING", 8, minimum=1)
LAUNCH_RATE = env_int("PEFTLAB_LAUNCH_RATE", 30, minimum=1)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = False

# Leases: a running run's worker renews its lease every RUN_HEARTBEAT_EVERY_S from a thread of
# its own; the reaper (`manage.py reaper`) marks a run whose lease is RUN_LEASE_S old lost and
# sends it again, up to RUN_MAX_ATTEMPTS claims in all. A lost run not claimed again within
# RUN_RESEND_AFTER_S (its message vanished with a broker restart) is sent once more.
RUN_HEARTBEAT_EVERY_S = env_int("PEFTLAB_RUN_HEARTBEAT_EVERY_S", 5, minimum=1)
RUN_LEASE_S = env_int("PEFTLAB_RUN_LEASE_S", 30, minimum=3 * RUN_HEARTBEAT_EVERY_S)
RUN_REAPER_EVERY_S = env_int("PEFTLAB_RUN_REAPER_EVERY_S", 10, minimum=1)
RUN_MAX_ATTEMPTS = env_int("PEFTLAB_RUN_MAX_ATTEMPTS", 3, minimum=1)
RUN_RESEND_AFTER_S = env_int("PEFTLAB_RUN_RESEND_AFTER_S", 600, minimum=10)
# Checkpoints (adapter, optimizer, RNG, step) every so many steps, unless the run sets its own.
RUN_CHECKPOINT_EVERY_STEPS = env_int("PEFTLAB_RUN_CHECKPOINT_EVERY_STEPS", 100, minimum=1)
# A run keeps its last so many checkpoints in the artifact store (the newest that still passes
# its sha256 check is resumed from); all go when the run ends.
CHECKPOINTS_KEPT = env_int("PEFTLAB_CHECKPOINTS_KEPT", 2, minimum=1)
# Where model-sized bytes live (checkpoints, merged exports, datasets;
# webapp/experiments/store.py): file:///abs/dir, or file:// alone for VAR_DIR/artifacts,
# or s3://bucket/prefix. Adapters stay in the database unless ADAPTERS_IN_STORE (70B, r >= 64).
ARTIFACT_STORE = env_str("PEFTLAB_ARTIFACT_STORE", "file://")
ADAPTERS_IN_STORE = env_bool("PEFTLAB_ADAPTERS_IN_STORE", False)
# On an S3 store a big download may be a redirect to a short-lived presigned URL instead of
# passing through the web process; the bytes are then checked once written (read back) and
# by the scheduled check (`manage.py verify_artifacts`), as the web cannot hash them in flight.
S3_PRESIGNED_URLS = env_bool("PEFTLAB_S3_PRESIGNED_URLS", False)
S3_PRESIGNED_TTL_S = env_int("PEFTLAB_S3_PRESIGNED_TTL_S", 300, minimum=10)
# `manage.py verify_artifacts` re-reads every stored file checked longer ago than this.
ARTIFACT_RECHECK_DAYS = env_int("PEFTLAB_ARTIFACT_RECHECK_DAYS", 7, minimum=1)


def artifact_storage(url: str) -> dict:
    """STORAGES["artifacts"] for PEFTLAB_ARTIFACT_STORE; s3:// takes the PEFTLAB_S3_* settings."""
    if url.startswith("s3://"):
        return artifact_storage_s3(url)
    if not url.startswith("file://"):
        raise ImproperlyConfigured(f"PEFTLAB_ARTIFACT_STORE={url!r}: use file://… or s3://…")
    root = Path(url.removeprefix("file://") or VAR_DIR / "artifacts")
    if not root.is_absolute():
        raise ImproperlyConfigured(f"PEFTLAB_ARTIFACT_STORE={url!r}: the path must be absolute")
    backend = "webapp.experiments.store.WriteOnceFileStorage"
    return {"BACKEND": backend, "OPTIONS": {"location": str(root.resolve())}}


def artifact_storage_s3(url: str) -> dict:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise ImproperlyConfigured(f"PEFTLAB_ARTIFACT_STORE={url!r} names no bucket")
    options = {
        "bucket_name": bucket,
        "location": prefix.strip("/"),
        "endpoint_url": env_str("PEFTLAB_S3_ENDPOINT_URL", "") or None,  # None: AWS
        "region_name": env_str("PEFTLAB_S3_REGION", "") or None,
        "access_key": env_str("PEFTLAB_S3_ACCESS_KEY_ID", "") or None,  # None: boto3's chain
        "secret_key": env_str("PEFTLAB_S3_SECRET_ACCESS_KEY", "") or None,
        "file_overwrite": False,
        "default_acl": None,
        "querystring_auth": True,
    }
    return {"BACKEND": "webapp.experiments.store_s3.WriteOnceS3Storage", "OPTIONS": options}


STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if STATIC_COLLECTED
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
    "artifacts": artifact_storage(ARTIFACT_STORE),
}
# While PostgreSQL is unreachable a worker keeps training and buffers its metrics; it waits
# this long for the database before giving up on a write it cannot skip (the end of a run).
RUN_DB_OUTAGE_S = env_int("PEFTLAB_RUN_DB_OUTAGE_S", 300, minimum=0)
RUN_LOG_LINES = 200
# Base models a worker keeps loaded between runs (parameter and buffer bytes), LRU.
MODEL_CACHE_MB = env_int("PEFTLAB_MODEL_CACHE_MB", 4096, minimum=1)
# Pre-flight: a worker estimates a run's peak memory from the model's shapes before loading
# it and fails the run as config when it cannot fit (peft_core/preflight.py). Off: try anyway.
PREFLIGHT = env_bool("PEFTLAB_PREFLIGHT", True)
# The memory a training worker has, for the launch form's warning (the web server is not the
# worker machine); 0: this machine's total memory.
WORKER_MEMORY_GIB = env_int("PEFTLAB_WORKER_MEMORY_GIB", 0, minimum=0)

# System metrics (workers/system.py): a training worker samples CPU %, RSS and each GPU's
# utilisation, memory and power this often and stores them as the run's sys/… metrics.
SYSTEM_METRICS_EVERY_S = env_int("PEFTLAB_SYSTEM_METRICS_EVERY_S", 15, minimum=1)
# The code's git commit for a run's lineage (an image build passes it in); empty: ask git in
# BASE_DIR when it is a checkout, else "unknown".
GIT_SHA = env_str("PEFTLAB_GIT_SHA", "")
# The GPUs this worker's runs use, as CUDA numbers them (indices or GPU-… UUIDs); unset: all.
# Read here, as every setting is, so that system metrics and lineage name only those GPUs.
CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")

# CI sets this: a test run that needs PostgreSQL and Redis must fail, not skip, without them.
REQUIRE_SERVICES = env_bool("PEFTLAB_REQUIRE_SERVICES", False)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # django-axes logs every successful login at INFO; the audit log already has them.
    "loggers": {"axes": {"level": "WARNING"}},
}

# REST API (/api/v1/): a personal token (Authorization: Bearer …) or the browser's session,
# whose unsafe requests need the CSRF token as the pages' do.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "webapp.api.auth.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON nested past the decoder's recursion limit is a 400 here, not a 500.
    "DEFAULT_PARSER_CLASSES": [
        "webapp.api.parsers.DepthSafeJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "PEFT Lab API",
    "DESCRIPTION": "Launch, watch and compare parameter-efficient fine-tuning runs.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Two models have a "status" field with other choices: name each enum.
    "ENUM_NAME_OVERRIDES": {
        "RunStatusEnum": "webapp.experiments.models.RunStatus",
        "ModelStatusEnum": "webapp.registry.models.ModelStatus",
    },
}

# Secrets shown once (API tokens, share links, invitations) are stored as SHA-256 digests.
API_TOKEN_TOUCH_SECONDS = 60  # last-used time is written at most this often per token
SHARE_LINK_MAX_DAYS = env_int("PEFTLAB_SHARE_LINK_MAX_DAYS", 90, minimum=1)
INVITATION_DAYS = env_int("PEFTLAB_INVITATION_DAYS", 7, minimum=1)
