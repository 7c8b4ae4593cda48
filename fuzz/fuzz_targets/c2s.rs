//! Fuzz the c2s state machine behind the framer: arbitrary client bytes, optionally after a valid
//! login (with or without XEP-0198 enabled), against a live router with a second bound session; the
//! session ends broken, so resumable ones detach and a second stream may resume them. Finds panics
//! on input-driven paths in c2s, SASL, stream management, server-answered iqs and routing.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use tern::auth::{AuthThrottle, Authenticator};
use tern::config::AuthConfig;
use tern::store::accounts::AccountStore;
use tern::xmpp::c2s::{Action, C2s, C2sContext};
use tern::xmpp::framer::{Framer, FramerLimits};
use tern::xmpp::router::{Router, SessionHandle};
use tern::xmpp::sm::{ResumptionRegistry, SmConfig};

const HDR: &str = "<stream:stream to='localhost' xmlns='jabber:client' \
                   xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

fn ctx() -> Arc<C2sContext> {
    static CTX: OnceLock<Arc<C2sContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tern-fuzz-c2s-{}", std::process::id()));
        let store = Arc::new(AccountStore::open(&dir).expect("account store"));
        // One PBKDF2 iteration: the fuzzer logs in on every run.
        store.add("fuzz@localhost", "pw", 1).expect("add account");
        let cfg = AuthConfig {
            device_secret: Some("fuzz-device-secret-0123".into()),
            device_scram_iterations: 1,
            ..AuthConfig::default()
        };
        Arc::new(C2sContext {
            domain: "localhost".into(),
            router: Arc::new(Router::with_max_resources(4)),
            auth: Arc::new(Authenticator::new("localhost", &cfg, store)),
            throttle: Arc::new(AuthThrottle::new(&cfg)),
            preauth_timeout: Duration::from_secs(30),
            preauth_max_bytes: 65536,
            ping_interval: Some(Duration::from_secs(300)),
            ping_timeout: Duration::from_secs(60),
            sm: SmConfig::default(),
            resumption: Arc::new(ResumptionRegistry::new(SmConfig::default())),
            fates: None,
            extdisco: None,
        })
    })
    .clone()
}

/// Feed bytes through framer and state machine the way the connection task does.
fn feed(c2s: &mut C2s, framer: &mut Framer, bytes: &[u8], now: Instant) {
    c2s.on_bytes(bytes.len(), now);
    framer.push(bytes);
    loop {
        let mut progressed = false;
        while !c2s.is_closed() {
            match framer.next() {
                Ok(Some(ev)) => {
                    c2s.on_event(ev, now);
                    progressed = true;
                }
                Ok(None) => break,
                Err(e) => {
                    c2s.on_frame_error(&e);
                    break;
                }
            }
            if c2s.wants_io_first() {
                break;
            }
        }
        while let Some(a) = c2s.poll_action() {
            match a {
                Action::RestartStream => framer.reset(),
                Action::StartTls => c2s.on_tls_established(),
                _ => {}
            }
        }
        if !progressed || c2s.is_closed() {
            return;
        }
    }
}

fn client(secure: bool, now: Instant) -> (C2s, Framer, Arc<SessionHandle>) {
    let peer = "127.0.0.1:5000".parse().expect("literal");
    let handle = SessionHandle::new(8, peer);
    let c2s = C2s::new(ctx(), handle.clone(), peer, secure, now);
    let framer = Framer::new(FramerLimits {
        max_stanza_bytes: 16 * 1024,
        max_depth: 16,
    });
    (c2s, framer, handle)
}

fn login(user: &str, resource: &str, now: Instant) -> (C2s, Framer, Arc<SessionHandle>) {
    let (mut c, mut f, h) = client(true, now);
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0pw"));
    let script = format!(
        "{HDR}<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>{HDR}\
         <iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq><presence/>"
    );
    feed(&mut c, &mut f, script.as_bytes(), now);
    (c, f, h)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    // A peer the fuzzed session can route to.
    let (_peer, _pf, _ph) = login("fuzz", "peer", now);
    let (mut c, mut f, h) = match mode % 4 {
        0 => client(mode & 0x80 != 0, now),
        1 => login("fuzz", "me", now),
        2 => {
            let (mut c, mut f, h) = login("fuzz", "me", now);
            let enable = "<enable xmlns='urn:xmpp:sm:3' resume='true'/>";
            feed(&mut c, &mut f, enable.as_bytes(), now);
            (c, f, h)
        }
        _ => {
            let (mut c, mut f, h) = client(true, now);
            feed(&mut c, &mut f, HDR.as_bytes(), now);
            (c, f, h)
        }
    };
    // Split the input in two reads and let time pass in between.
    let cut = usize::from(mode >> 2).min(rest.len());
    feed(&mut c, &mut f, &rest[..cut], now);
    c.on_timeout(now + Duration::from_secs(400));
    feed(&mut c, &mut f, &rest[cut..], now + Duration::from_secs(1));
    let mut out = Vec::new();
    h.drain(usize::MAX, &mut out);
    c.on_routed(&out, now + Duration::from_secs(1));
    c.on_disconnected();
    // Whatever was detached is taken over by a new stream sending the same input after SASL.
    let (mut c2, mut f2, _) = client(true, now);
    let auth = base64::engine::general_purpose::STANDARD.encode("\0fuzz\0pw");
    let script = format!(
        "{HDR}<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>{HDR}"
    );
    feed(&mut c2, &mut f2, script.as_bytes(), now);
    feed(&mut c2, &mut f2, rest, now + Duration::from_secs(2));
    c2.on_disconnected();
    ctx().resumption.take_all();
});
