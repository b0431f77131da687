//! Behind the door: what a compromised host, a restored store and a single
//! person cannot do (issue 20). Each test plays the attack against a lab.

use std::time::Duration;

use serde_json::Value;
use wavegate::tls::{CertDir, Role, TlsFiles};
use wavegate_proto::v1 as pb;
use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(120);

fn audit_json(lab: &Lab) -> Vec<Value> {
    let log = lab.wavegate_as("auditor", &["audit", "log", "--output", "json"]);
    assert_eq!(log.status, 0, "{}", log.stderr);
    log.stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// An agent session made by hand with `host`'s own certificate: it says
/// Hello as that host and then sends `messages`, then waits until the
/// controller has read them (it answers on the same stream).
async fn forge(lab: &Lab, host: &str, messages: Vec<pb::AgentMessage>) {
    let certs = CertDir::new(lab.dir.join("certs"));
    let pair = certs.agent(host);
    let tls = TlsFiles::read(&certs.ca(), &pair.cert, &pair.key).expect("the lab's certificates");
    let channel = tonic::transport::Channel::from_shared(lab.controller())
        .expect("url")
        .tls_config(tls.client())
        .expect("tls")
        .connect()
        .await
        .expect("connect as an agent");
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let hello = pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::Hello {
            host_id: host.to_owned(),
            agent_version: "forged".into(),
            boot_id: "forged-boot".into(),
            protocol: wavegate_proto::PROTOCOL,
            updaters: Vec::new(),
            updaters_unknown: false,
        })),
    };
    tx.send(hello).await.expect("queue hello");
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("the controller takes the session")
        .into_inner();
    // The welcome: the session is open.
    let _ = inbound.message().await;
    for m in messages {
        tx.send(m).await.expect("queue");
    }
    drop(tx);
    // The controller ends its side once it has read ours to the end.
    while let Ok(Some(_)) = inbound.message().await {}
}

fn result(command_id: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Result(pb::CommandResult {
            command_id: command_id.to_owned(),
            outcome: pb::Outcome::Ok as i32,
            exit_code: 0,
            detail: "forged".into(),
            ..Default::default()
        })),
    }
}

fn output(rollout: &str, command_id: &str, text: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Output(pb::OutputChunk {
            command_id: command_id.to_owned(),
            data: text.as_bytes().to_vec(),
            offset: 0,
            dropped: 0,
            rollout_id: rollout.to_owned(),
            step: "fail slowly".into(),
        })),
    }
}

/// With s2's certificate, a session answers s1's failing canary step
/// "ok", injects output into it, and floods output for a rollout that
/// does not exist. The canary still fails on its own result, nothing
/// forged is stored, and every attempt is in the audit log.
#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn one_hosts_certificate_cannot_answer_or_write_for_another_host() {
    let lab = Lab::up("trust-forge", "lab-fleet.yaml");
    let plan = lab.write_plan(
        "slow-fail",
        "name: slow-fail
targets:
  hosts: [s1]
steps:
  - name: fail slowly
    run: sleep 6; echo the real output; exit 1
    writes: [/var/tmp/slow]
    timeout: 30s
    dry_run: {allow_failure: \"the step fails on purpose; the test forges its result\"}
waves:
  - size: 1
health:
  bake: 100ms
  interval: 50ms
",
    );
    let id = lab.submit_path(&plan);
    lab.approve(&id);
    // The real step's command id, as s1's agent journaled it: the worst
    // case, an id that leaked.
    let cmd = eventually(LONG, "s1 to accept its step", || {
        lab.jobs("s1")
            .into_iter()
            .filter_map(|j| j["command_id"].as_str().map(str::to_owned))
            .find(|c| c.starts_with(&format!("{id}:")) && c.contains(":step0"))
    });
    let flood: Vec<pb::AgentMessage> = (0..50)
        .map(|i| {
            output(
                "r9999-zzzzzz",
                &format!("r9999-zzzzzz:0:s2:step0:{i}"),
                &"x".repeat(32 << 10),
            )
        })
        .collect();
    let mut messages = vec![result(&cmd), output(&id, &cmd, "everything is fine\n")];
    messages.extend(flood);
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(forge(&lab, "s2", messages));

    let status = lab.wait_state(&id, "halted", LONG);
    let s1 = &status["waves"][0]["hosts"][0];
    assert_eq!(s1["state"], "failed", "the forged \"ok\" was taken: {status:#}");
    let logs = lab.wavegate_as("auditor", &["rollout", "logs", &id, "s1"]);
    assert!(logs.stdout.contains("the real output"), "{}", logs.stdout);
    assert!(
        !logs.stdout.contains("everything is fine"),
        "forged output was stored:\n{}",
        logs.stdout
    );
    // The first refusal of the session names the forged result; the count
    // of all of them is written when the session ends (all 52, unless s2's
    // own agent took its session back first and cut ours short).
    let refused = eventually(Duration::from_secs(30), "the refusals in the audit log", || {
        let texts: Vec<String> = audit_json(&lab)
            .iter()
            .filter(|r| r["body"]["kind"] == "refusal")
            .filter_map(|r| r["body"]["text"].as_str().map(str::to_owned))
            .filter(|t| t.contains("agent for s2"))
            .collect();
        texts
            .iter()
            .any(|t| t.contains("results or output chunks for commands not sent to it"))
            .then_some(texts)
    });
    assert!(
        refused.iter().any(|t| t.contains(&cmd)),
        "the forged result is in the audit log: {refused:#?}"
    );
    let stored = lab.wavegate_as("auditor", &["rollout", "logs", "r9999-zzzzzz"]);
    assert_ne!(stored.status, 0, "a rollout that does not exist has output");
    lab.audit_verifies();
}

/// A store put back from a copy counts its rollouts again. The new
/// rollout must not get the old one's id: the agents would answer its
/// step from their journals and restore the old snapshot.
#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_store_put_back_from_a_copy_never_gives_an_id_twice() {
    let lab = Lab::up("trust-restore", "lab-fleet.yaml");
    let data = lab.dir.join("controller");
    let copy = lab.dir.join("controller-copy");
    let stop = |lab: &Lab| {
        let addr = std::fs::read_to_string(lab.dir.join("controller.addr")).expect("addr");
        let mut args = lab.kill9(&["serve", "--data"], "exec-step");
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = addr.trim().to_owned();
        }
        args
    };
    let copy_dir = |from: &std::path::Path, to: &std::path::Path| {
        let _ = std::fs::remove_dir_all(to);
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .expect("cp");
        assert!(ok.success());
    };
    // The backup, taken before anything ran.
    let args = stop(&lab);
    copy_dir(&data, &copy);
    lab.respawn(&args, "controller-2");
    lab.wait_agents();

    let plan = |text: &str| {
        format!(
            "name: marker-{text}
targets:
  hosts: [s1]
steps:
  - name: mark
    run: echo {text} >> /etc/wg-marker
    writes: [/etc/wg-marker]
    timeout: 20s
waves:
  - size: 1
health:
  bake: 100ms
  interval: 50ms
"
        )
    };
    let first = lab.submit_path(&lab.write_plan("one", &plan("one")));
    lab.approve(&first);
    lab.wait_state(&first, "completed", LONG);
    assert_eq!(lab.read_host("s1", "/etc/wg-marker").as_deref(), Some("one\n"));

    // The store is lost and put back from the copy.
    let args = stop(&lab);
    let _ = std::fs::remove_dir_all(&data);
    copy_dir(&copy, &data);
    lab.respawn(&args, "controller-3");
    lab.wait_agents();

    let second = lab.submit_path(&lab.write_plan("two", &plan("two")));
    assert_ne!(second, first, "an id was given twice");
    lab.approve(&second);
    lab.wait_state(&second, "completed", LONG);
    assert_eq!(
        lab.read_host("s1", "/etc/wg-marker").as_deref(),
        Some("one\ntwo\n"),
        "the new rollout's step ran (it was not answered from the old one's journal)"
    );
    // Undone from its own snapshot, not the old rollout's.
    lab.rollback(&second);
    assert_eq!(
        lab.read_host("s1", "/etc/wg-marker").as_deref(),
        Some("one\n"),
        "the rollback restored the new rollout's snapshot"
    );
    lab.audit_verifies();
}

/// One person with two approver certificates under two names approves
/// once; a certificate of the submitter's own person cannot approve.
#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn approvals_count_people_not_certificates() {
    let lab = Lab::up("trust-people", "lab-fleet.yaml");
    let certs = CertDir::new(lab.dir.join("certs"));
    // Another certificate from the lab's CA, as an identity file like the
    // lab's own.
    let identity = |name: &str, role: Role, person: &str| {
        let pair = certs.issue_operator(name, role, person).expect("issue");
        let mut text = String::new();
        for (k, v) in lab.identity("approver") {
            let v = match k.as_str() {
                "WAVEGATE_CERT" => pair.cert.display().to_string(),
                "WAVEGATE_KEY" => pair.key.display().to_string(),
                _ => v,
            };
            text.push_str(&format!("export {k}='{v}'\n"));
        }
        std::fs::write(lab.dir.join("identities").join(format!("{name}.env")), text).expect("identity");
    };
    identity("approver-laptop", Role::Approver, "approver@lab");
    identity("submitter-too", Role::Approver, "submitter@lab");
    let plan = lab.write_plan(
        "two-approvals",
        "name: two-approvals
approvals: 2
targets:
  hosts: [s1]
steps:
  - name: mark
    run: echo x >> /etc/wg-two
    writes: [/etc/wg-two]
waves:
  - size: 1
health:
  bake: 100ms
  interval: 50ms
",
    );
    let id = lab.submit_path(&plan);
    let own = lab.wavegate_as("submitter-too", &["rollout", "approve", &id]);
    assert_eq!(
        own.status, 3,
        "the submitter approved under another name:\n{}",
        own.stderr
    );
    lab.approve(&id);
    let twice = lab.wavegate_as("approver-laptop", &["rollout", "approve", &id]);
    assert_eq!(twice.status, 3, "one person approved twice:\n{}", twice.stderr);
    assert!(twice.stderr.contains("approver@lab"), "{}", twice.stderr);
    let status = lab.status(&id);
    assert_eq!(status["state"], "awaiting_approval", "{status:#}");
    assert_eq!(status["approvers"].as_array().map(Vec::len), Some(1), "{status:#}");
    let run = lab.wavegate_as("admin", &["rollout", "approve", &id]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    lab.wait_state(&id, "completed", LONG);
    let texts: Vec<String> = audit_json(&lab)
        .iter()
        .filter(|r| r["body"]["kind"] == "refusal")
        .filter_map(|r| r["body"]["text"].as_str().map(str::to_owned))
        .collect();
    assert!(
        texts.iter().any(|t| t.contains("approver-laptop")),
        "the second approval of one person is in the audit log: {texts:#?}"
    );
    lab.audit_verifies();
}
