"""The benchmark's peers, configured once for every harness: nginx as the upstream (a 2-byte,
a 1 KiB and a 64 KiB body), weft's mesh.yaml, Envoy and HAProxy, each a plain HTTP/1.1 reverse
proxy to nginx with one worker. bench/run.py imports it; bench/instructions.sh runs it:

    python3 bench/peers.py DIR UPSTREAM WEFT ENVOY ENVOY_ADMIN HAPROXY   (ports on 127.0.0.1)
"""
import os
import sys


def write_configs(work, up, weft, envoy, envoy_admin, haproxy):
    """Writes nginx.conf, 64k, mesh.yaml, envoy.yaml and haproxy.cfg into `work`."""
    with open(os.path.join(work, "nginx.conf"), "w") as f:
        f.write(f"""daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{up}; client_body_temp_path {work};
    location = / {{ return 200 "ok"; }}
    location = /1k {{ return 200 "{'x' * 1024}"; }}
    location = /64k {{ alias {work}/64k; }} }} }}
""")
    with open(os.path.join(work, "64k"), "wb") as f:
        f.write(b"y" * 65536)
    with open(os.path.join(work, "mesh.yaml"), "w") as f:
        f.write(f"""services:
  - {{name: upstream, protocol: http1, endpoints: [{{address: "127.0.0.1:{up}"}}]}}
routes:
  - {{name: all, hosts: ["*"], rules: [{{backends: [{{service: upstream}}]}}]}}
""")
    with open(os.path.join(work, "envoy.yaml"), "w") as f:
        f.write(f"""static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {envoy}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: upstream}}}}]}}]
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}}}]}}]
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {envoy_admin}}}}}}}
""")
    with open(os.path.join(work, "haproxy.cfg"), "w") as f:
        f.write(f"""global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{haproxy}
  default_backend be
backend be
  server up 127.0.0.1:{up}
""")


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    write_configs(sys.argv[1], *(int(p) for p in sys.argv[2:]))
