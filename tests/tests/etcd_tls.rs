//! Mutual TLS to etcd, on a real 3-member cluster that accepts only clients
//! with a certificate from its CA: `store status` and a controller's
//! election work with `--etcd-ca/--etcd-cert/--etcd-key`, and nothing
//! works without them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wavegate_tests::etcd::EtcdCluster;
use wavegate_tests::{fixture, wavegate, wavegate_bin};

#[test]
fn the_store_reaches_an_etcd_that_demands_client_certificates_only_with_them() {
    let etcd = EtcdCluster::start_tls("tls").expect("a local etcd cluster with TLS");
    let tls = etcd.dir.join("tls");
    let flags = |name: &str| tls.join(name).display().to_string();
    let with = [
        "--etcd-ca".to_owned(),
        flags("ca.pem"),
        "--etcd-cert".to_owned(),
        flags("client.pem"),
        "--etcd-key".to_owned(),
        flags("client.key"),
    ];

    let run = wavegate(
        ["store", "status", "--store", &etcd.url, "--output", "json"]
            .iter()
            .map(|s| s.to_string())
            .chain(with.iter().cloned()),
    );
    assert_eq!(run.status, 0, "store status over mTLS:\n{}\n{}", run.stdout, run.stderr);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(v["quorum"], true, "{v:#}");
    assert_eq!(
        v["members"]
            .as_array()
            .map(|m| m.iter().filter(|m| m["ok"] == true).count()),
        Some(3),
        "{v:#}"
    );

    let without = wavegate(["store", "status", "--store", &etcd.url]);
    assert_eq!(
        without.status, 1,
        "no quorum without TLS:\n{}\n{}",
        without.stdout, without.stderr
    );
    assert!(without.stdout.contains("NO"), "{}", without.stdout);

    // A controller elects itself over mutual TLS and is ready.
    let data = etcd.dir.join("controller");
    let (addr, web) = (etcd.dir.join("addr"), etcd.dir.join("web.addr"));
    let log = std::fs::File::create(etcd.dir.join("controller.log")).expect("log");
    let mut serve = Command::new(wavegate_bin())
        .args(["serve", "--insecure-plaintext-for-local-dev"])
        .arg("--data")
        .arg(&data)
        .arg("--fleet")
        .arg(fixture("lab-fleet.yaml"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--web-listen",
            "127.0.0.1:0",
            "--lease-ttl",
            "3s",
        ])
        .arg("--addr-file")
        .arg(&addr)
        .arg("--web-addr-file")
        .arg(&web)
        .args(["--store", &etcd.url, "--store-prefix", "/tls-test"])
        .args(&with)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        if let Ok(w) = std::fs::read_to_string(&web) {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &format!("http://{}/ready", w.trim()),
                ])
                .output()
                .expect("curl");
            if out.stdout == b"200" {
                break true;
            }
        }
        if Instant::now() > deadline || serve.try_wait().ok().flatten().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = serve.kill();
    let _ = serve.wait();
    let log = std::fs::read_to_string(etcd.dir.join("controller.log")).unwrap_or_default();
    assert!(ready, "the controller did not lead over mTLS:\n{log}");
    assert!(log.contains("Elected leader"), "{log}");
}
