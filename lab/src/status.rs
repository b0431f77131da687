//! `lab status`: the lab's controller and which agents are connected.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use wavegate_operator::client::Conn;
use wavegate_operator::output::Output;
use wavegate_proto::v1 as pb;

use crate::absolute;
use crate::certs::lab_conn;

pub(crate) async fn fetch_fleet(conn: &Conn) -> Result<pb::FleetResponse> {
    let mut client = conn.connect().await?;
    Ok(client.fleet(pb::FleetRequest {}).await?.into_inner())
}

pub(crate) async fn status(dir: &Path, output: Output) -> Result<u8> {
    let dir = absolute(dir)?;
    let lab: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("lab.json")).with_context(|| format!("no lab in {}", dir.display()))?,
    )?;
    let url = match lab["controllers"].as_array() {
        Some(all) => all.iter().filter_map(|u| u.as_str()).collect::<Vec<_>>().join(","),
        None => lab["controller"].as_str().unwrap_or_default().to_owned(),
    };
    let fleet = fetch_fleet(&lab_conn(&dir, &url, "admin")).await?;
    let up = fleet.hosts.iter().filter(|h| h.connected).count();
    let doc = json!({
        "controller": url,
        "web": lab["web"],
        "hosts": fleet.hosts.iter().map(|h| json!({"id": h.id, "role": h.role, "connected": h.connected})).collect::<Vec<_>>(),
    });
    if output.emit(&doc)? {
        return Ok(if up == fleet.hosts.len() { 0 } else { 1 });
    }
    println!("controller {url}: {up} of {} agents connected", fleet.hosts.len());
    for h in &fleet.hosts {
        println!(
            "  {:<12} {:<10} {}",
            h.id,
            h.role,
            if h.connected { "connected" } else { "DISCONNECTED" }
        );
    }
    Ok(if up == fleet.hosts.len() { 0 } else { 1 })
}
