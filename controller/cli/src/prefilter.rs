//! `palisade prefilter add|delete|list`: the XDP prefilter's CIDR deny list.

use clap::Subcommand;
use palisade_api::client::Client;
use palisade_api::prefilter::{PrefilterChange, PrefilterView};

use crate::commands::{Output, print_json};
use crate::output::table;

#[derive(Debug, Subcommand)]
pub enum PrefilterCmd {
    /// Deny packets from these source CIDRs on the node's host-facing interfaces (all or none).
    Add {
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Remove CIDRs added with `prefilter add` (all or none).
    Delete {
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// The deny list, what each entry dropped, and the interfaces it is attached to.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

fn print(view: &PrefilterView, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(view);
    }
    if view.devices.is_empty() {
        println!("Devices: none (start the agent with --prefilter-device IFNAME)");
    } else {
        let devices: Vec<String> = view
            .devices
            .iter()
            .map(|d| format!("{} ({} XDP)", d.name, d.mode))
            .collect();
        println!("Devices: {}", devices.join(", "));
    }
    let rows: Vec<Vec<String>> = view
        .entries
        .iter()
        .map(|e| {
            vec![
                e.cidr.clone(),
                e.sources.join(","),
                e.packets.to_string(),
                e.bytes.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["CIDR", "SOURCE", "DROPPED PACKETS", "DROPPED BYTES"],
            &rows
        )
    );
    Ok(())
}

pub async fn run(client: &Client, cmd: PrefilterCmd) -> anyhow::Result<()> {
    match cmd {
        PrefilterCmd::Add { cidrs, output } => {
            let view: PrefilterView = client
                .post("/v1/prefilter", &PrefilterChange { cidrs })
                .await?;
            print(&view, output)
        }
        PrefilterCmd::Delete { cidrs, output } => {
            let view: PrefilterView = client
                .post("/v1/prefilter/delete", &PrefilterChange { cidrs })
                .await?;
            print(&view, output)
        }
        PrefilterCmd::List { output } => {
            let view: PrefilterView = client.get("/v1/prefilter").await?;
            print(&view, output)
        }
    }
}
