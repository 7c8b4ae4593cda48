-- Prosody configuration for the comparison benchmarks (Debian package prosody 0.12.3): a
-- loopback-only `localhost` vhost, c2s with direct TLS (XEP-0368) and STARTTLS, plain-text
-- accounts (SASL PLAIN checked against the stored password, as ejabberd's
-- `auth_password_format: plain` and Tern's device credentials: no PBKDF2 per login), the epoll
-- backend, no rate limits (mod_limits is not loaded) and no s2s/HTTP. The @…@ placeholders are
-- filled in by benches/prosody/prosody.sh.

daemonize = false
pidfile = "@DIR@/prosody.pid"
data_path = "@DIR@/data"
log = { warn = "@DIR@/prosody.log" }

network_backend = "epoll"
network_settings = {
	tcp_backlog = 4096; -- as Tern's listeners and ejabberd's `backlog: 4096`
	read_timeout = 3600; -- idle sessions of the capacity run must not be closed
}
interfaces = { "127.0.0.1" }
local_interfaces = { "127.0.0.1" }
c2s_ports = { @STARTTLS_PORT@ }
c2s_direct_tls_ports = { @TLS_PORT@ }
s2s_ports = { }
http_ports = { }
https_ports = { }
c2s_require_encryption = true
c2s_timeout = 60
c2s_stanza_size_limit = 262144

certificates = "@DIR@/certs"
ssl = {
	certificate = "@DIR@/certs/localhost.crt";
	key = "@DIR@/certs/localhost.key";
}

authentication = "internal_plain"
storage = "internal"
allow_registration = false

-- Only what the benchmark needs (c2s and message/presence/iq routing are always loaded): no
-- roster module, offline storage, MAM, carbons or stream management, as in the ejabberd setup.
modules_enabled = { "saslauth"; "tls"; "disco"; "ping" }
modules_disabled = { "s2s"; "offline" } -- loaded by default otherwise

-- The benchmark runs the server as root (pinned with taskset); mod_posix would refuse otherwise.
run_as_root = true

VirtualHost "localhost"
