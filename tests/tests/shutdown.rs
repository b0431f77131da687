//! SIGTERM stops a controller that has agents connected: it lets the
//! sessions go, closes both listeners and exits 0, in bounded time. (And
//! on the way, an agent of another protocol version is refused.)

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use wavegate_proto::v1 as pb;
use wavegate_tests::lab::eventually;
use wavegate_tests::{fixture, wavegate_bin};

fn scratch() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wavegate-shutdown-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

fn read_addr(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

#[test]
fn sigterm_with_an_agent_connected_stops_every_listener_and_exits() {
    let dir = scratch();
    let mut child = Command::new(wavegate_bin())
        .arg("serve")
        .arg("--data")
        .arg(&dir)
        .arg("--fleet")
        .arg(fixture("lab-fleet.yaml"))
        .args(["--listen", "127.0.0.1:0", "--web-listen", "127.0.0.1:0"])
        .arg("--addr-file")
        .arg(dir.join("grpc.addr"))
        .arg("--web-addr-file")
        .arg(dir.join("web.addr"))
        .arg("--insecure-plaintext-for-local-dev")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wavegate serve");
    let grpc = eventually(Duration::from_secs(30), "the controller to listen", || {
        read_addr(&dir.join("grpc.addr"))
    });
    let web = read_addr(&dir.join("web.addr")).expect("the web address is written first");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = format!("http://{grpc}");
    // An agent of another release (it reads commands in another shape) is
    // refused before it is sent anything.
    let (_old_tx, refused) = rt.block_on(session(url.clone(), wavegate_proto::PROTOCOL - 1));
    let status = refused.expect_err("an agent of another protocol is refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("agent protocol"), "{status:?}");
    // An agent session that stays open (as every connected agent's does).
    let (tx, mut inbound) = rt.block_on(async {
        let (tx, opened) = session(url.clone(), wavegate_proto::PROTOCOL).await;
        let mut inbound = opened.expect("session").into_inner();
        let welcome = inbound.message().await.expect("welcome");
        assert!(welcome.is_some(), "the session is open");
        (tx, inbound)
    });

    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(sent.success());
    // The controller ends the session itself: the agent's stream ends.
    let ended = rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), inbound.message()).await });
    assert!(
        matches!(ended, Ok(Ok(None)) | Ok(Err(_))),
        "the agent session was not ended: {ended:?}"
    );
    let status = eventually(Duration::from_secs(20), "the controller to exit", || {
        child.try_wait().expect("wait")
    });
    assert!(status.success(), "exit status {status:?}");
    for addr in [&grpc, &web] {
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{addr} still accepts connections after the controller stopped"
        );
    }
    drop(tx);
    let _ = std::fs::remove_dir_all(&dir);
}

type Session = (
    tokio::sync::mpsc::Sender<pb::AgentMessage>,
    Result<tonic::Response<tonic::Streaming<pb::ControllerMessage>>, tonic::Status>,
);

/// Open an agent session for `s1` speaking `protocol`.
async fn session(url: String, protocol: u32) -> Session {
    let channel = tonic::transport::Channel::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::Hello {
            host_id: "s1".into(),
            agent_version: "test".into(),
            boot_id: "b1".into(),
            protocol,
            updaters: Vec::new(),
            updaters_unknown: false,
        })),
    })
    .await
    .expect("hello");
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("x-wavegate-identity", "wavegate://agent/s1".parse().expect("header"));
    (tx, client.session(req).await)
}
