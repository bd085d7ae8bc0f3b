//! Access tokens (`token create`, `token revoke`) and the traffic
//! simulator (`simulate`).

use std::process::ExitCode;
use std::time::Duration;

use crate::api::auth::Role;
use crate::config::Config;
use crate::{sim, store};

pub(super) async fn create_token(
    config: Config,
    role: Role,
    reseller: Option<String>,
    name: Option<String>,
) -> anyhow::Result<ExitCode> {
    let pool = store::connect(&config.database_url, 1).await?;
    store::migrate(&pool).await?;
    let (id, token) =
        crate::api::auth::create_token(&pool, role, reseller.as_deref(), name.as_deref()).await?;
    eprintln!(
        "created {id} (role {}{})",
        role.as_str(),
        reseller
            .as_deref()
            .map(|r| format!(", reseller {r}"))
            .unwrap_or_default()
    );
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn revoke_token(config: Config, token_id: String) -> anyhow::Result<ExitCode> {
    let pool = store::connect(&config.database_url, 1).await?;
    if !crate::api::auth::revoke_token(&pool, &token_id).await? {
        anyhow::bail!("no live token {token_id}");
    }
    println!("revoked {token_id}");
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn simulate(config: Config, args: sim::SimArgs) -> anyhow::Result<ExitCode> {
    config.ensure_topics().await?;
    let mut gateway = match (&args.check, args.holds) {
        (Some(addr), true) => {
            let pool = store::connect(&config.database_url, 1).await?;
            store::migrate(&pool).await?;
            let (_, token) =
                crate::api::auth::create_token(&pool, Role::Gateway, None, Some("simulate --holds"))
                    .await?;
            Some(sim::Gateway::new(addr, &token))
        }
        _ => None,
    };
    let expected = sim::run(&config.kafka_brokers, &config.topics, &args, gateway.as_mut()).await?;
    if let Some(g) = &gateway {
        println!(
            "holds: {} placed (each settled by its usage event, or released), {} released for failed requests, {} requests refused",
            g.placed, g.released, g.refused
        );
    }
    if let Some(addr) = &args.check {
        // A finance token of its own to read balances with.
        let pool = store::connect(&config.database_url, 1).await?;
        store::migrate(&pool).await?;
        let (_, token) =
            crate::api::auth::create_token(&pool, Role::Finance, None, Some("simulate --check"))
                .await?;
        let ok = sim::check(
            addr,
            &token,
            &expected,
            Duration::from_secs(args.check_timeout_secs),
        )
        .await?;
        if !ok {
            eprintln!("some balances do not match what the simulator computed");
            return Ok(ExitCode::FAILURE);
        }
        println!("all balances match");
    }
    Ok(ExitCode::SUCCESS)
}
