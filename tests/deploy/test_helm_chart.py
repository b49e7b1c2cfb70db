"""The Helm chart: linted and rendered by Helm itself, validated against the Kubernetes schemas, and asserted on.

Helm runs in-process through helm-python-sdk (Helm's Go SDK behind a C ABI, bundled in the wheel): no helm binary
and no network. Manifests are checked with kubernetes-validate's offline schemas in strict mode (unknown fields
are errors) for the newest Kubernetes it knows and for the oldest the chart supports (Chart.yaml kubeVersion).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from .support import CHART, FIXTURES, NAMESPACE, RELEASE, SCENARIOS, Manifest, Render, kinds, load_values, only
from .support import scenario_id as _scenario_id

KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]  # oldest supported (Chart.yaml kubeVersion) and current
CUSTOM_RESOURCE_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): FIXTURES / "servicemonitor-v1.schema.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): FIXTURES / "prometheusrule-v1.schema.json",
}
FULLNAME = "log-bridge"  # release "log-bridge" + chart "log-bridge" collapse into one name
SCENARIO_IDS = [_scenario_id(p) for p in SCENARIOS]
SECRET_ENV = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "DD_API_KEY", "LOG_BRIDGE_TOKEN", "SPLUNK_HEC_TOKEN"]


def scenario(name: str) -> dict[str, Any]:
    """Values of the scenario file ci/<name>-values.yaml."""
    return load_values(CHART / "ci" / f"{name}-values.yaml")


def statefulset(manifests: list[Manifest]) -> Manifest:
    """The StatefulSet."""
    return only(manifests, "StatefulSet")


def container(manifests: list[Manifest]) -> dict[str, Any]:
    """The log-bridge container of the StatefulSet."""
    containers = statefulset(manifests)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "log-bridge")


def env_by_name(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    """The container's environment, by variable name."""
    return {e["name"]: e for e in container(manifests)["env"]}


def pod_annotations(manifests: list[Manifest]) -> dict[str, str]:
    """Annotations of the StatefulSet's pod template."""
    annotations: dict[str, str] = statefulset(manifests)["spec"]["template"]["metadata"]["annotations"]
    return annotations


def rendered_config(manifests: list[Manifest]) -> dict[str, Any]:
    """The log-bridge config held by the ConfigMap, parsed."""
    config: dict[str, Any] = yaml.safe_load(only(manifests, "ConfigMap")["data"]["config.yaml"])
    return config


def test_the_four_required_scenarios_exist() -> None:
    assert {"default", "ingress-tls", "all-sinks-existing-secret", "hpa"} <= set(SCENARIO_IDS)


class TestLint:
    """`helm lint --strict` (warnings are errors) for every scenario."""

    @pytest.mark.parametrize("path", SCENARIOS, ids=SCENARIO_IDS)
    @pytest.mark.parametrize("kube_version", KUBERNETES_VERSIONS)
    def test_lint_is_clean(self, helm: ModuleType, path: Path, kube_version: str) -> None:
        report = helm.lint(str(CHART), load_values(path), strict=True, kube_version=f"v{kube_version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [], report
        assert problems == [], problems

    def test_lint_reports_a_broken_chart(self, helm: ModuleType, tmp_path: Path) -> None:
        """The linter really runs: a template error is reported."""
        broken = tmp_path / "log-bridge"
        helm.Chart.load(str(CHART)).save_dir(str(tmp_path))
        (broken / "templates" / "broken.yaml").write_text("{{ .Values.nope.deeper }}\n")
        report = helm.lint(str(broken), {}, strict=True)
        assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"])


class TestSchemas:
    """Every rendered manifest is valid for Kubernetes (strict: no unknown fields)."""

    @pytest.mark.parametrize("path", SCENARIOS, ids=SCENARIO_IDS)
    @pytest.mark.parametrize("kube_version", KUBERNETES_VERSIONS)
    def test_every_manifest_validates(
        self, render: Render, kubernetes_validate: ModuleType, path: Path, kube_version: str
    ) -> None:
        manifests = render(load_values(path))
        assert manifests
        for manifest in manifests:
            custom = CUSTOM_RESOURCE_SCHEMAS.get((manifest["apiVersion"], manifest["kind"]))
            if custom is not None:
                # jsonschema comes with kubernetes-validate (it is what that package validates with).
                kubernetes_validate.utils.jsonschema.validate(manifest, json.loads(custom.read_text()))
                continue
            # SchemaNotFoundError (an unknown kind or apiVersion) is a failure too, not a pass.
            kubernetes_validate.validate(manifest, kube_version, strict=True)

    def test_validation_catches_a_bad_manifest(self, render: Render, kubernetes_validate: ModuleType) -> None:
        """The validator really checks: a misspelt field is refused."""
        sts = copy.deepcopy(statefulset(render()))
        sts["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(sts, KUBERNETES_VERSIONS[-1], strict=True)

    @pytest.mark.parametrize("path", SCENARIOS, ids=SCENARIO_IDS)
    def test_every_resource_is_namespaced_and_labelled(self, render: Render, path: Path) -> None:
        for manifest in render(load_values(path)):
            metadata = manifest["metadata"]
            assert metadata["namespace"] == NAMESPACE, metadata["name"]
            assert metadata["labels"]["app.kubernetes.io/instance"] == RELEASE
            # The helm test pod has a name of its own, so that no selector of the replicas takes it for one.
            name = "log-bridge-test" if manifest["kind"] == "Pod" else "log-bridge"
            assert metadata["labels"]["app.kubernetes.io/name"] == name


class TestDefaults:
    """What the default values render."""

    def test_resources(self, render: Render) -> None:
        assert sorted(kinds(render())) == sorted(
            [
                "ConfigMap",
                "PodDisruptionBudget",
                "Pod",  # the helm test pod
                "Secret",
                "Service",
                "Service",  # headless, governs the StatefulSet
                "ServiceAccount",
                "StatefulSet",
            ]
        )

    def test_configmap_holds_values_config(self, chart: Any, render: Render) -> None:
        expected = copy.deepcopy(chart.values["config"])
        expected.setdefault("server", {})["admin"] = {"port": 9090}  # admin.enabled
        assert rendered_config(render()) == expected

    def test_container_serves_the_config(self, render: Render) -> None:
        manifests = render()
        main = container(manifests)
        assert main["command"] == ["log-bridge", "serve"]
        assert main["args"] == ["--config", "/etc/log-bridge/config.yaml"]
        mount = next(m for m in main["volumeMounts"] if m["name"] == "config")
        assert mount["mountPath"] == "/etc/log-bridge/config.yaml"
        assert mount["readOnly"] is True
        assert main["ports"] == [
            {"name": "http", "containerPort": 8443, "protocol": "TCP"},
            {"name": "admin", "containerPort": 9090, "protocol": "TCP"},
        ]

    def test_container_port_follows_config(self, render: Render) -> None:
        manifests = render({"config": {"server": {"port": 9000}}})
        assert container(manifests)["ports"][0]["containerPort"] == 9000
        assert rendered_config(manifests)["server"]["port"] == 9000

    def test_graceful_shutdown_time(self, render: Render) -> None:
        pod = statefulset(render())["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 30


class TestSecurity:
    """Non-root, read-only root filesystem, no capabilities: in every scenario."""

    @pytest.mark.parametrize("path", SCENARIOS, ids=SCENARIO_IDS)
    def test_pods_run_locked_down(self, render: Render, path: Path) -> None:
        manifests = render(load_values(path))
        pods = [statefulset(manifests)["spec"]["template"]["spec"]]
        pods += [m["spec"] for m in manifests if m["kind"] == "Pod"]
        for pod in pods:
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] != 0
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["runAsNonRoot"] is True
                assert sc["runAsUser"] != 0
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert "add" not in sc["capabilities"]

    def test_writable_places_are_volumes(self, render: Render) -> None:
        """With a read-only root, only the journal volume and /tmp are writable."""
        mounts = {m["mountPath"]: m["name"] for m in container(render())["volumeMounts"]}
        assert mounts["/var/lib/log-bridge"] == "journal"
        assert mounts["/tmp"] == "tmp"

    def test_journal_and_file_sink_live_on_the_journal_volume(self, chart: Any) -> None:
        config = chart.values["config"]
        mount = chart.values["persistence"]["mountPath"]
        assert config["journal"]["path"].startswith(mount + "/")
        for sink in config["sinks"].values():
            if sink["type"] == "file":
                assert sink["path"].startswith(mount + "/")

    def test_uid_matches_the_image(self, chart: Any) -> None:
        dockerfile = (CHART.parents[1] / "Dockerfile").read_text()
        match = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
        assert match, "the Dockerfile's final USER must be numeric UID:GID"
        uid, gid = int(match[1]), int(match[2])
        assert chart.values["podSecurityContext"]["runAsUser"] == uid
        assert chart.values["podSecurityContext"]["runAsGroup"] == gid
        assert chart.values["podSecurityContext"]["fsGroup"] == gid
        assert chart.values["securityContext"]["runAsUser"] == uid


class TestProbes:
    """Liveness on /healthz, readiness on /readyz, on the named port, with the pod's scheme."""

    @pytest.mark.parametrize("path", SCENARIOS, ids=SCENARIO_IDS)
    def test_probes(self, render: Render, path: Path) -> None:
        values = load_values(path)
        main = container(render(values))
        admin = values.get("admin", {}).get("enabled", True)
        scheme = "HTTPS" if values.get("tls", {}).get("enabled") and not admin else "HTTP"
        port = "admin" if admin else "http"
        assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port, "scheme": scheme}
        assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port, "scheme": scheme}
        assert main["startupProbe"]["httpGet"]["path"] == "/healthz"

    def test_admin_port(self, render: Render) -> None:
        """With admin.enabled (the default) the probes go to the plain-HTTP admin listener, also when the stream
        port is mTLS, and so does the ServiceMonitor, through the headless Service only."""
        values = {
            "tls": {"enabled": True, "secretName": "tls", "clientAuth": True},
            "serviceMonitor": {"enabled": True, "relabelings": [{"action": "labeldrop", "regex": "pod"}]},
            "networkPolicy": {"enabled": True, "adminFrom": [{"podSelector": {}}]},
        }
        manifests = render(values)
        main = container(manifests)
        assert {"name": "admin", "containerPort": 9090, "protocol": "TCP"} in main["ports"]
        assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin", "scheme": "HTTP"}
        assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin", "scheme": "HTTP"}
        assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin", "scheme": "HTTP"}
        assert rendered_config(manifests)["server"]["admin"] == {"port": 9090}
        assert rendered_config(manifests)["server"]["tls"]["client_ca_file"]
        services = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Service"}
        assert [p["name"] for p in services[FULLNAME]["spec"]["ports"]] == ["http"]
        headless = services[f"{FULLNAME}-headless"]
        assert {"name": "admin", "port": 9090, "targetPort": "admin", "protocol": "TCP"} in headless["spec"]["ports"]
        assert "prometheus.io/service-monitor" not in headless["metadata"]["labels"]  # the monitor selects it
        assert services[FULLNAME]["metadata"]["labels"]["prometheus.io/service-monitor"] == "false"  # not this one
        (endpoint,) = only(manifests, "ServiceMonitor")["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["scheme"], "tlsConfig" in endpoint) == ("admin", "http", False)
        assert endpoint["relabelings"] == [
            {"action": "replace", "targetLabel": "job", "replacement": FULLNAME},  # as through the main Service
            {"action": "labeldrop", "regex": "pod"},
        ]
        stream, admin = only(manifests, "NetworkPolicy")["spec"]["ingress"]
        assert stream["ports"] == [{"port": "http", "protocol": "TCP"}]
        assert admin["ports"] == [{"port": "admin", "protocol": "TCP"}]
        assert admin["from"][0] == {"podSelector": {}}  # and the helm test pod
        open_policy = only(render({"networkPolicy": {"enabled": True}}), "NetworkPolicy")
        assert "from" not in open_policy["spec"]["ingress"][1]

    @pytest.mark.parametrize("kube_version", KUBERNETES_VERSIONS)
    def test_without_admin_the_chart_renders_as_before(
        self, render: Render, kubernetes_validate: ModuleType, kube_version: str
    ) -> None:
        """admin.enabled false: everything on the stream port, with the pod's scheme, as before the admin port.
        (Checked against the chart of the commit before it: the same manifests, for every scenario.)"""
        values = {
            "admin": {"enabled": False},
            "tls": {"enabled": True, "secretName": "tls"},
            "serviceMonitor": {"enabled": True},
            "networkPolicy": {"enabled": True},
        }
        manifests = render(values)
        main = container(manifests)
        assert main["ports"] == [{"name": "http", "containerPort": 8443, "protocol": "TCP"}]
        assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTPS"}
        assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "scheme": "HTTPS"}
        assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTPS"}
        assert "admin" not in rendered_config(manifests)["server"]
        for service in (m for m in manifests if m["kind"] == "Service"):
            assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
        headless = only(manifests, "Service", name=f"{FULLNAME}-headless")
        assert headless["metadata"]["labels"]["prometheus.io/service-monitor"] == "false"
        (endpoint,) = only(manifests, "ServiceMonitor")["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["scheme"], endpoint["tlsConfig"]) == (
            "http",
            "https",
            {"insecureSkipVerify": True},
        )
        assert "relabelings" not in endpoint
        (rule,) = only(manifests, "NetworkPolicy")["spec"]["ingress"]
        assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
        for manifest in manifests:
            custom = CUSTOM_RESOURCE_SCHEMAS.get((manifest["apiVersion"], manifest["kind"]))
            if custom is not None:
                kubernetes_validate.utils.jsonschema.validate(manifest, json.loads(custom.read_text()))
            else:
                kubernetes_validate.validate(manifest, kube_version, strict=True)


class TestJournalStorage:
    """A claim per replica that outlives scale-down, so a replica scaled up again drains its backlog."""

    @pytest.mark.parametrize("path", SCENARIOS, ids=SCENARIO_IDS)
    def test_claim_template(self, render: Render, path: Path) -> None:
        values = load_values(path)
        spec = statefulset(render(values))["spec"]
        (claim,) = spec["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "journal"
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        size = values.get("persistence", {}).get("size", "10Gi")
        assert claim["spec"]["resources"]["requests"]["storage"] == size
        assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenScaled": "Retain", "whenDeleted": "Retain"}
        volumes = {v["name"] for v in spec["template"]["spec"]["volumes"]}
        assert "journal" not in volumes  # it comes from the claim template, not from an emptyDir

    def test_storage_class(self, render: Render) -> None:
        spec = statefulset(render(scenario("all-sinks-existing-secret")))["spec"]
        assert spec["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"

    def test_without_persistence_an_emptydir(self, render: Render) -> None:
        spec = statefulset(render({"persistence": {"enabled": False}}))["spec"]
        assert "volumeClaimTemplates" not in spec
        assert "persistentVolumeClaimRetentionPolicy" not in spec
        volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
        assert volumes["journal"] == {"name": "journal", "emptyDir": {}}

    def test_governing_headless_service(self, render: Render) -> None:
        manifests = render()
        headless = only(manifests, "Service", name=f"{FULLNAME}-headless")
        assert headless["spec"]["clusterIP"] == "None"
        assert statefulset(manifests)["spec"]["serviceName"] == f"{FULLNAME}-headless"


class TestConfigChecksum:
    """A config change rolls the pods; anything else leaves the checksum alone."""

    def test_changes_with_config(self, render: Render) -> None:
        before = pod_annotations(render())["checksum/config"]
        after = pod_annotations(render({"config": {"journal": {"max_bytes": 2048}}}))["checksum/config"]
        assert re.fullmatch(r"[0-9a-f]{64}", before)
        assert before != after

    def test_changes_with_tls(self, render: Render) -> None:
        """tls.enabled rewrites server.tls in the config, so it rolls the pods too."""
        before = pod_annotations(render())["checksum/config"]
        after = pod_annotations(render({"tls": {"enabled": True, "secretName": "x"}}))["checksum/config"]
        assert before != after

    def test_stable_otherwise(self, render: Render) -> None:
        before = pod_annotations(render())["checksum/config"]
        assert pod_annotations(render({"replicas": 4, "resources": {}}))["checksum/config"] == before
        assert pod_annotations(render())["checksum/config"] == before

    def test_secret_values_roll_the_pods(self, render: Render) -> None:
        before = pod_annotations(render())["checksum/secret"]
        after = pod_annotations(render({"secrets": {"values": {"DD_API_KEY": "new"}}}))["checksum/secret"]
        assert before != after

    def test_no_secret_checksum_with_an_existing_secret(self, render: Render) -> None:
        assert "checksum/secret" not in pod_annotations(render(scenario("all-sinks-existing-secret")))

    def test_secret_checksums_are_not_plain_hashes_of_the_secrets(self, chart: Any, render: Render) -> None:
        """Was a defect: checksum/dedup was the sha256 of the Redis URL, password included, and checksum/secret
        that of secrets.values (as JSON): anyone allowed to read the pods, not the Secrets, could test guesses of
        a weak password against them offline, billions a second. They go through scrypt first."""
        url = "rediss://:hunter2@redis.audit.svc:6380/0"
        values = {"dedup": {"redis": {"enabled": True, "url": url}}, "secrets": {"values": {"DD_API_KEY": "k"}}}
        secrets = copy.deepcopy(chart.values["secrets"])
        secrets["values"]["DD_API_KEY"] = "k"
        as_helm_json = json.dumps(secrets, sort_keys=True, separators=(",", ":"))  # what toJson gives
        annotations = pod_annotations(render(values))
        for material in (url, as_helm_json):
            assert hashlib.sha256(material.encode()).hexdigest() not in annotations.values()
        for key in ("checksum/secret", "checksum/dedup"):
            assert re.fullmatch(r"[0-9a-f]{64}", annotations[key])
        assert pod_annotations(render(values)) == annotations  # the same values, the same checksums


class TestSecrets:
    """Secrets reach the container as environment variables the config references with ${VAR}."""

    def test_env_from_the_chart_secret(self, render: Render) -> None:
        env = env_by_name(render())
        for name in SECRET_ENV:
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": FULLNAME, "key": name, "optional": True}
        assert env["LOG_BRIDGE_CONFIG"]["value"] == "/etc/log-bridge/config.yaml"

    def test_env_from_an_existing_secret(self, render: Render) -> None:
        values = scenario("all-sinks-existing-secret")
        manifests = render(values)
        assert "Secret" not in kinds(manifests)
        env = env_by_name(manifests)
        for name, key in values["secrets"]["keys"].items():
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "log-bridge-credentials", "key": key, "optional": True}

    def test_config_references_only_injected_variables(self, render: Render) -> None:
        """Every ${VAR} in each scenario's config is set in the container."""
        for path in SCENARIOS:
            manifests = render(load_values(path))
            text = only(manifests, "ConfigMap")["data"]["config.yaml"]
            referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}", text))
            assert referenced, path
            assert referenced <= set(env_by_name(manifests)), path

    def test_generated_token(self, render: Render) -> None:
        secret = only(render(), "Secret")
        assert set(secret["data"]) == {"LOG_BRIDGE_TOKEN"}  # empty values make no keys
        token = base64.b64decode(secret["data"]["LOG_BRIDGE_TOKEN"]).decode()
        assert re.fullmatch(r"[A-Za-z0-9]{48}", token)

    def test_given_values(self, render: Render) -> None:
        values = {"secrets": {"values": {"LOG_BRIDGE_TOKEN": "t0k", "SPLUNK_HEC_TOKEN": "hec", "DD_API_KEY": ""}}}
        data = only(render(values), "Secret")["data"]
        assert {k: base64.b64decode(v).decode() for k, v in data.items()} == {
            "LOG_BRIDGE_TOKEN": "t0k",
            "SPLUNK_HEC_TOKEN": "hec",
        }

    def test_a_variable_can_be_dropped(self, render: Render) -> None:
        env = env_by_name(render({"secrets": {"keys": {"DD_API_KEY": None}}}))
        assert "DD_API_KEY" not in env
        assert "LOG_BRIDGE_TOKEN" in env


class TestTLS:
    """In-pod HTTPS from a mounted TLS Secret."""

    def test_mounted_and_configured(self, render: Render) -> None:
        manifests = render(scenario("all-sinks-existing-secret"))
        pod = statefulset(manifests)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "log-bridge-tls"
        mounts = {m["name"]: m for m in container(manifests)["volumeMounts"]}
        assert mounts["tls"]["mountPath"] == "/etc/log-bridge/tls"
        assert rendered_config(manifests)["server"]["tls"] == {
            "cert_file": "/etc/log-bridge/tls/tls.crt",
            "key_file": "/etc/log-bridge/tls/tls.key",
        }

    def test_client_auth(self, render: Render) -> None:
        config = rendered_config(render({"tls": {"enabled": True, "secretName": "x", "clientAuth": True}}))
        assert config["server"]["tls"]["client_ca_file"] == "/etc/log-bridge/tls/ca.crt"

    def test_needs_a_secret_name(self, helm: ModuleType, render: Render) -> None:
        with pytest.raises(helm.HelmError, match="tls.secretName"):
            render({"tls": {"enabled": True}})

    def test_off_by_default(self, render: Render) -> None:
        manifests = render()
        assert "tls" not in rendered_config(manifests)["server"]
        assert "tls" not in {v["name"] for v in statefulset(manifests)["spec"]["template"]["spec"]["volumes"]}


class TestService:
    """The client address survives for the WorkOS allowlist."""

    def test_load_balancer_keeps_the_client_address(self, render: Render) -> None:
        values = scenario("all-sinks-existing-secret")
        service = only(render(values), "Service", name=FULLNAME)
        assert service["spec"]["type"] == "LoadBalancer"
        assert service["spec"]["externalTrafficPolicy"] == "Local"
        assert service["spec"]["loadBalancerSourceRanges"] == values["service"]["loadBalancerSourceRanges"]
        assert service["spec"]["ports"] == [{"name": "http", "port": 443, "targetPort": "http", "protocol": "TCP"}]

    def test_cluster_ip_has_no_traffic_policy(self, render: Render) -> None:
        """externalTrafficPolicy is refused by the API server on a ClusterIP Service, so it is left out."""
        service = only(render({"service": {"externalTrafficPolicy": "Local"}}), "Service", name=FULLNAME)
        assert service["spec"]["type"] == "ClusterIP"
        assert "externalTrafficPolicy" not in service["spec"]

    def test_selects_the_pods(self, render: Render) -> None:
        manifests = render()
        selector = only(manifests, "Service", name=FULLNAME)["spec"]["selector"]
        labels = statefulset(manifests)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()


class TestIngress:
    def test_tls_ingress(self, render: Render) -> None:
        ingress = only(render(scenario("ingress-tls")), "Ingress")
        assert ingress["spec"]["ingressClassName"] == "nginx"
        assert ingress["spec"]["tls"] == [{"hosts": ["audit-logs.example.com"], "secretName": "log-bridge-ingress-tls"}]
        (rule,) = ingress["spec"]["rules"]
        assert rule["host"] == "audit-logs.example.com"
        backend = rule["http"]["paths"][0]["backend"]["service"]
        assert backend == {"name": FULLNAME, "port": {"name": "http"}}

    def test_trusted_proxies_set_with_an_ingress(self) -> None:
        """Behind an Ingress the pods see the controller's address: X-Forwarded-For must be trusted from it."""
        assert scenario("ingress-tls")["config"]["server"]["trusted_proxies"]

    def test_off_by_default(self, render: Render) -> None:
        assert "Ingress" not in kinds(render())

    @pytest.mark.parametrize("values", [{"ingress": {"enabled": True}}, scenario("ingress-tls")])
    def test_routes_only_the_stream_paths(self, render: Render, values: dict[str, Any]) -> None:
        """/metrics, /healthz and /readyz are for the cluster: the Ingress does not publish them."""
        manifests = render(values)
        streams = {stream["path"] for stream in rendered_config(manifests)["streams"]}
        for rule in only(manifests, "Ingress")["spec"]["rules"]:
            for route in rule["http"]["paths"]:
                assert route["path"] in streams
                assert route["pathType"] == "Exact"


class TestAutoscaling:
    def test_hpa_scales_the_statefulset(self, render: Render) -> None:
        manifests = render(scenario("hpa"))
        hpa = only(manifests, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": FULLNAME}
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
        targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"]}
        assert targets == {"cpu": 60, "memory": 75}
        assert "replicas" not in statefulset(manifests)["spec"]  # left to the HPA

    def test_pdb_with_several_replicas(self, render: Render) -> None:
        pdb = only(render(scenario("hpa")), "PodDisruptionBudget")
        assert pdb["spec"]["minAvailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"] == {
            "app.kubernetes.io/name": "log-bridge",
            "app.kubernetes.io/instance": RELEASE,
        }

    def test_pdb_never_blocks_a_single_replica(self, render: Render) -> None:
        pdb = only(render(), "PodDisruptionBudget")
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}

    def test_topology_spread_gets_the_selector(self, render: Render) -> None:
        pod = statefulset(render(scenario("hpa")))["spec"]["template"]["spec"]
        (constraint,) = pod["topologySpreadConstraints"]
        assert constraint["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE


class TestMonitoringAndNetwork:
    def test_servicemonitor(self, render: Render) -> None:
        monitor = only(render(scenario("all-sinks-existing-secret")), "ServiceMonitor")
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == "admin"  # plain HTTP, while the pods serve HTTPS on the LoadBalancer's port
        assert endpoint["path"] == "/metrics"
        assert endpoint["scheme"] == "http"
        assert "tlsConfig" not in endpoint
        (without_admin,) = only(
            render({**scenario("all-sinks-existing-secret"), "admin": {"enabled": False}}), "ServiceMonitor"
        )["spec"]["endpoints"]
        assert (without_admin["port"], without_admin["scheme"]) == ("http", "https")
        assert without_admin["tlsConfig"] == {"insecureSkipVerify": True}

    def test_networkpolicy(self, render: Render) -> None:
        policy = only(render(scenario("ingress-tls")), "NetworkPolicy")
        rule, admin = policy["spec"]["ingress"]
        assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
        peers = rule["from"]
        assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} in peers
        monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        assert monitoring not in peers  # Prometheus scrapes the admin port
        assert admin["ports"] == [{"port": "admin", "protocol": "TCP"}]
        assert admin["from"][0] == monitoring
        assert admin["from"][1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"
        metrics = {"networkPolicy": {**scenario("ingress-tls")["networkPolicy"], "metricsFrom": [monitoring]}}
        assert monitoring in only(render(metrics), "NetworkPolicy")["spec"]["ingress"][0]["from"]
        test_pod_labels = [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p]
        assert test_pod_labels and test_pod_labels[0]["app.kubernetes.io/component"] == "test"
        dns = policy["spec"]["egress"][0]["ports"]
        assert {"port": 53, "protocol": "UDP"} in dns

    def test_networkpolicy_open_ingress_by_default(self, render: Render) -> None:
        policy = only(render({"networkPolicy": {"enabled": True}}), "NetworkPolicy")
        assert "from" not in policy["spec"]["ingress"][0]


class TestHelmTest:
    @pytest.mark.parametrize("path", SCENARIOS, ids=SCENARIO_IDS)
    def test_pod_calls_healthz(self, render: Render, path: Path) -> None:
        values = load_values(path)
        pod = only(render(values), "Pod")
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert pod["spec"]["restartPolicy"] == "Never"
        command = pod["spec"]["containers"][0]["command"]
        assert command[:2] == ["python", "-c"]
        scheme = "https" if values.get("tls", {}).get("enabled") else "http"
        port = values.get("service", {}).get("port", 8443)
        if values.get("config", {}).get("server", {}).get("refuse_unlisted"):  # the stream port would refuse it
            assert command[-1] == f"http://{FULLNAME}-headless:9090/healthz"
        else:
            assert command[-1] == f"{scheme}://{FULLNAME}:{port}/healthz"
        compile(command[2], "<helm-test>", "exec")  # the inline script is valid Python

    def test_can_be_turned_off(self, render: Render) -> None:
        assert "Pod" not in kinds(render({"tests": {"enabled": False}}))

    @pytest.mark.parametrize("path", SCENARIOS, ids=SCENARIO_IDS)
    def test_is_not_taken_for_a_replica(self, render: Render, path: Path) -> None:
        """Was a defect: the pod carried the replicas' selector labels, so the NetworkPolicy's egress rules (DNS
        and the sinks' ports) applied to it and cut its own call to the Service, and the Services, the budget
        and the HPA counted it as a replica. Its own labels match no selector; the policy still admits it."""
        values = load_values(path)
        manifests = render({**values, "networkPolicy": {**values.get("networkPolicy", {}), "enabled": True}})
        labels = only(manifests, "Pod")["metadata"]["labels"]

        def selects(selector: dict[str, str]) -> bool:
            return all(labels.get(key) == value for key, value in selector.items())

        selectors = [m["spec"]["selector"] for m in manifests if m["kind"] == "Service"]
        selectors += [only(manifests, kind)["spec"]["selector"]["matchLabels"] for kind in ("StatefulSet",)]
        selectors += [m["spec"]["selector"]["matchLabels"] for m in manifests if m["kind"] == "PodDisruptionBudget"]
        selectors.append(only(manifests, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
        assert not any(selects(selector) for selector in selectors), labels
        for rule in only(manifests, "NetworkPolicy")["spec"]["ingress"]:
            peers = [p["podSelector"]["matchLabels"] for p in rule.get("from", []) if "podSelector" in p]
            assert "from" not in rule or any(selects(peer) for peer in peers), rule

    def test_under_mutual_tls_it_calls_the_admin_port(self, render: Render) -> None:
        """Was a defect: with tls.clientAuth the pod called the stream port without a client certificate and
        failed, whatever the service's health. It calls the admin port, which the NetworkPolicy lets it reach."""
        mtls = {
            "tls": {"enabled": True, "secretName": "tls", "clientAuth": True},
            "networkPolicy": {"enabled": True, "adminFrom": [{"namespaceSelector": {"matchLabels": {"a": "b"}}}]},
        }
        manifests = render(mtls)
        command = only(manifests, "Pod")["spec"]["containers"][0]["command"]
        assert command[-1] == f"http://{FULLNAME}-headless:9090/healthz"
        _, admin = only(manifests, "NetworkPolicy")["spec"]["ingress"]
        assert admin["ports"] == [{"port": "admin", "protocol": "TCP"}]
        test_pods = [p["podSelector"]["matchLabels"] for p in admin["from"] if "podSelector" in p]
        assert [labels["app.kubernetes.io/component"] for labels in test_pods] == ["test"]
        without_admin = render({**mtls, "admin": {"enabled": False}})
        assert only(without_admin, "Pod")["spec"]["containers"][0]["command"][-1].startswith("https://")

    def test_with_refuse_unlisted_it_calls_the_admin_port(self, render: Render) -> None:
        """Was a defect: with config.server.refuse_unlisted the stream port closes the pod's connection at accept
        (its address is not WorkOS's), so helm test failed on a healthy release. It calls the admin port."""
        manifests = render({"config": {"server": {"refuse_unlisted": True}}})
        assert rendered_config(manifests)["server"]["refuse_unlisted"] is True
        command = only(manifests, "Pod")["spec"]["containers"][0]["command"]
        assert command[-1] == f"http://{FULLNAME}-headless:9090/healthz"
        assert container(manifests)["livenessProbe"]["httpGet"]["port"] == "admin"

    def test_refuse_unlisted_needs_the_admin_port(self, helm: ModuleType, render: Render) -> None:
        """Without the admin port the kubelet's probes (from the node's address) and the scrapes would be closed
        at accept: the pods would never be ready and would be restarted by the liveness probe."""
        with pytest.raises(helm.HelmError, match=r"config.server.refuse_unlisted needs admin.enabled"):
            render({"config": {"server": {"refuse_unlisted": True}}, "admin": {"enabled": False}})


class TestNotes:
    @pytest.mark.parametrize("path", SCENARIOS, ids=SCENARIO_IDS)
    def test_tell_how_to_point_workos_at_it(self, render_files: Any, path: Path) -> None:
        notes = render_files(load_values(path))["log-bridge/templates/NOTES.txt"]
        assert "Audit Logs -> Log Streams" in notes
        assert "/workos" in notes
        assert "Authorization" in notes

    def test_ingress_address(self, render_files: Any) -> None:
        notes = render_files(scenario("ingress-tls"))["log-bridge/templates/NOTES.txt"]
        assert "https://audit-logs.example.com" in notes

    def test_warns_about_replicas_that_deduplicate_alone(self, render_files: Any) -> None:
        warning = "more than one replica without dedup.redis"
        assert warning in render_files(scenario("hpa"))["log-bridge/templates/NOTES.txt"]
        assert warning not in render_files(scenario("replicas-redis"))["log-bridge/templates/NOTES.txt"]
        assert warning not in render_files()["log-bridge/templates/NOTES.txt"]

    def test_says_what_refuse_unlisted_does_to_the_trial_send(self, render_files: Any) -> None:
        """The trial send-test from a pod gets 403, or with refuse_unlisted a closed connection: the notes say
        which, rather than promise a 403 that never comes."""
        notes = render_files({"config": {"server": {"refuse_unlisted": True}}})["log-bridge/templates/NOTES.txt"]
        assert "closed before any answer" in notes
        assert "closed before any answer" not in render_files()["log-bridge/templates/NOTES.txt"]

    def test_warns_when_the_client_address_is_lost(self, render_files: Any) -> None:
        notes = render_files({"service": {"type": "LoadBalancer"}})["log-bridge/templates/NOTES.txt"]
        assert "externalTrafficPolicy" in notes and "WARNING" in notes


class TestValuesDocumentation:
    """Every value has a `# key -- description` comment (on itself or on an enclosing value)."""

    DOC = re.compile(r"^\s*#\s*([A-Za-z0-9_.]+)\s+--\s+\S", re.MULTILINE)

    @staticmethod
    def _leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
        paths: list[str] = []
        for key, value in values.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                paths.append(path)
                paths.extend(TestValuesDocumentation._leaves(value, path + "."))
            else:
                paths.append(path)
        return paths

    def test_every_value_documented(self) -> None:
        text = (CHART / "values.yaml").read_text()
        documented = set(self.DOC.findall(text))
        values = yaml.safe_load(text)
        missing = []
        for path in self._leaves(values):
            parts = path.split(".")
            prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
            is_group = isinstance(self._get(values, parts), dict) and self._get(values, parts)
            if not prefixes & documented and not is_group:
                missing.append(path)
        assert missing == []

    def test_no_stale_documentation(self) -> None:
        text = (CHART / "values.yaml").read_text()
        values = yaml.safe_load(text)
        stale = [p for p in self.DOC.findall(text) if self._get(values, p.split(".")) is self._MISSING]
        assert stale == []

    _MISSING = object()

    @classmethod
    def _get(cls, values: Any, parts: list[str]) -> Any:
        for part in parts:
            if not isinstance(values, dict) or part not in values:
                return cls._MISSING
            values = values[part]
        return values


class TestValuesSchema:
    """values.schema.json: typos in values fail the install instead of being ignored."""

    @pytest.mark.parametrize(
        "values",
        [
            {"replica": 3},
            {"service": {"externalTrafficPolicy": "local"}},
            {"persistence": {"retentionPolicy": {"whenScaled": "Remove"}}},
            {"image": {"digest": "latest"}},
            {"secrets": {"keys": {"NOT-AN-ENV-NAME": "x"}}},
        ],
    )
    def test_refuses(self, helm: ModuleType, chart: Any, values: dict[str, Any]) -> None:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)

    @pytest.mark.parametrize("duration", ["30 minutes", "1h30m", "30min", "-5s", ""])
    @pytest.mark.parametrize("key", ["drainJob", "dedup.redis"])
    def test_refuses_a_duration_log_bridge_would_not_read(
        self, helm: ModuleType, chart: Any, key: str, duration: str
    ) -> None:
        """Was a defect: any string passed, and the chart's own reading of drainJob.timeout took the leading number
        and the last letter, so "1h30m" gave `drain --timeout 60` and "30 minutes" gave 30 seconds."""
        values: dict[str, Any] = {"timeout": duration}
        for part in reversed(key.split(".")):
            values = {part: values}
        with pytest.raises(helm.HelmValuesError, match="timeout"):
            chart.validate_schema(values)

    @pytest.mark.parametrize("duration", ["30m", "90", 90, 1.5, "500ms", "2h", "1.5h", "7d", "10 s"])
    def test_takes_log_bridge_durations(self, chart: Any, duration: Any) -> None:
        chart.validate_schema({"drainJob": {"timeout": duration}, "dedup": {"redis": {"timeout": duration}}})

    @pytest.mark.parametrize("path", SCENARIOS, ids=SCENARIO_IDS)
    def test_scenarios_pass(self, chart: Any, path: Path) -> None:
        chart.validate_schema(load_values(path))

    def test_covers_every_value(self, chart: Any) -> None:
        schema = json.loads((CHART / "values.schema.json").read_text())
        assert set(chart.values) == set(schema["properties"]) - {"global"}
        for key, value in chart.values.items():
            nested = schema["properties"][key]
            if isinstance(value, dict) and nested.get("additionalProperties") is False:
                assert set(value) <= set(nested["properties"]), key


class TestShutdown:
    """The grace period follows config.server.shutdown_timeout: delivery after intake stops, then requests in flight."""

    @pytest.mark.parametrize(("shutdown", "grace"), [(None, 35), ("30s", 75), ("2m", 255), (45, 105), ("1500ms", 19)])
    def test_grace_period_is_derived(self, render: Render, shutdown: Any, grace: int) -> None:
        values = {} if shutdown is None else {"config": {"server": {"shutdown_timeout": shutdown}}}
        pod = statefulset(render(values))["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == grace

    @pytest.mark.parametrize(
        ("pre_stop", "grace"),
        [
            ({"exec": {"command": ["sleep", "30"]}}, 60),  # e.g. a cloud load balancer's deregistration delay
            ({"exec": {"command": ["sleep", "1m"]}}, 90),
            ({"sleep": {"seconds": 20}}, 50),  # Kubernetes' own sleep action
            ({"exec": {"command": ["/bin/sh", "-c", "drain-somewhere"]}}, 35),  # unknown length: 5 s, as before
            (None, 30),
        ],
    )
    def test_grace_period_follows_the_pre_stop_pause(self, render: Render, pre_stop: Any, grace: int) -> None:
        """Was a defect: the grace period counted 5 s for the preStop pause whatever lifecycle said, so a longer
        pause (the kubelet counts it in the grace period) left too little time: with sleep 30 the SIGTERM came at
        30 s and the SIGKILL at 35 s, cutting the drain and the requests in flight."""
        pod = statefulset(render({"lifecycle": {"preStop": pre_stop}}))["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == grace

    def test_an_explicit_grace_period_wins(self, render: Render) -> None:
        pod = statefulset(render({"terminationGracePeriodSeconds": 300}))["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 300

    def test_readiness_probe_is_readyz(self, render: Render) -> None:
        """/readyz turns 503 the moment SIGTERM arrives, so the Service stops sending before intake stops."""
        probe = container(render())["readinessProbe"]
        assert probe["httpGet"]["path"] == "/readyz" and probe["periodSeconds"] <= 5


class TestReplicas:
    def test_autoscaling_keeps_two_replicas_and_a_budget_by_default(self, chart: Any, render: Render) -> None:
        assert chart.values["autoscaling"]["minReplicas"] >= 2
        manifests = render({"autoscaling": {"enabled": True}})
        assert only(manifests, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 2
        assert only(manifests, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


class TestSharedDedup:
    """dedup.redis: journal.dedup_store in the config, the URL from a Secret."""

    def test_off_by_default(self, render: Render) -> None:
        manifests = render()
        assert "dedup_store" not in rendered_config(manifests)["journal"]
        assert "LOG_BRIDGE_REDIS_URL" not in env_by_name(manifests)

    def test_url_in_the_chart_secret(self, render: Render) -> None:
        url = "rediss://:s3cret@redis.audit.svc:6380/0"
        manifests = render({"dedup": {"redis": {"enabled": True, "url": url}}})
        assert rendered_config(manifests)["journal"]["dedup_store"] == {
            "type": "redis",
            "url": "${LOG_BRIDGE_REDIS_URL}",
            "key_prefix": "log-bridge:dedup:",
            "timeout": "250ms",
        }
        ref = env_by_name(manifests)["LOG_BRIDGE_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": FULLNAME, "key": "LOG_BRIDGE_REDIS_URL"}  # not optional: the config needs it
        assert base64.b64decode(only(manifests, "Secret")["data"]["LOG_BRIDGE_REDIS_URL"]).decode() == url
        assert "s3cret" not in only(manifests, "ConfigMap")["data"]["config.yaml"]
        other = render({"dedup": {"redis": {"enabled": True, "url": url.replace("s3cret", "rotated")}}})
        assert pod_annotations(other)["checksum/dedup"] != pod_annotations(manifests)["checksum/dedup"]

    def test_url_from_an_existing_secret(self, render: Render) -> None:
        manifests = render(scenario("replicas-redis"))
        ref = env_by_name(manifests)["LOG_BRIDGE_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "log-bridge-redis", "key": "url"}
        assert "LOG_BRIDGE_REDIS_URL" not in only(manifests, "Secret")["data"]
        assert rendered_config(manifests)["journal"]["dedup_store"]["key_prefix"] == "audit:log-bridge:dedup:"

    @pytest.mark.parametrize(
        ("values", "message"),
        [
            ({"dedup": {"redis": {"enabled": True}}}, "dedup.redis.enabled needs dedup.redis.url or"),
            (
                {"dedup": {"redis": {"enabled": True, "url": "redis://r"}}, "secrets": {"existingSecret": "creds"}},
                "set dedup.redis.existingSecret",
            ),
        ],
    )
    def test_incomplete_settings_fail(self, helm: ModuleType, render: Render, values: Any, message: str) -> None:
        with pytest.raises(helm.HelmError, match=message):
            render(values)

    def test_schema_refuses_a_non_redis_url(self, helm: ModuleType, chart: Any) -> None:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"dedup": {"redis": {"url": "http://redis:6379"}}})


class TestDrainJob:
    """drainJob.claimName: a Job that mounts a claim left behind and runs `log-bridge drain` on it."""

    def test_not_rendered_by_default(self, render: Render) -> None:
        assert "Job" not in kinds(render())

    def test_mounts_the_claim_and_drains_it(self, render: Render) -> None:
        manifests = render(scenario("replicas-redis"))
        job = only(manifests, "Job")
        pod = job["spec"]["template"]["spec"]
        (main,) = pod["containers"]
        assert main["command"] == ["log-bridge", "drain"]
        assert main["args"] == ["--config", "/etc/log-bridge/config.yaml", "--timeout", "3600"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["journal"]["persistentVolumeClaim"] == {"claimName": "journal-log-bridge-3"}
        assert volumes["config"]["configMap"]["name"] == FULLNAME
        mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
        assert mounts["journal"] == "/var/lib/log-bridge" and mounts["tmp"] == "/tmp"
        assert pod["restartPolicy"] == "Never" and main["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["fsGroup"] == 10001
        # The same environment as the replicas, so the same config resolves (the Redis URL included).
        env = {e["name"] for e in main["env"]}
        assert set(env_by_name(manifests)) - {"LOG_BRIDGE_CONFIG"} <= env
        # Its pods are not selected by the Service or the budget: they must never receive WorkOS traffic.
        selector = only(manifests, "Service", name=FULLNAME)["spec"]["selector"]
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert not all(labels.get(k) == v for k, v in selector.items())

    def test_has_the_replicas_extra_volumes_and_pod_metadata(self, render: Render) -> None:
        """Was a defect: the Job left out extraVolumes and extraVolumeMounts (a sink's CA bundle or client
        certificate, `tls.ca_file`), so building that sink failed and the backlog could not be drained; and
        podLabels and podAnnotations, which is where Azure Workload Identity's label, kube2iam's role or a
        mesh's settings go, so the sinks could not authenticate or connect as the replicas do."""
        ca = {"name": "splunk-ca", "configMap": {"name": "splunk-ca"}}
        mount = {"name": "splunk-ca", "mountPath": "/etc/log-bridge/splunk-ca", "readOnly": True}
        values = {
            **scenario("replicas-redis"),
            "extraVolumes": [ca],
            "extraVolumeMounts": [mount],
            "podLabels": {"azure.workload.identity/use": "true"},
            "podAnnotations": {"iam.amazonaws.com/role": "log-bridge"},
        }
        manifests = render(values)
        replica = statefulset(manifests)["spec"]["template"]
        drain = only(manifests, "Job")["spec"]["template"]
        assert ca in replica["spec"]["volumes"] and ca in drain["spec"]["volumes"]
        assert mount in container(manifests)["volumeMounts"] and mount in drain["spec"]["containers"][0]["volumeMounts"]
        for metadata in (replica["metadata"], drain["metadata"]):
            assert metadata["labels"]["azure.workload.identity/use"] == "true"
            assert metadata["annotations"]["iam.amazonaws.com/role"] == "log-bridge"
