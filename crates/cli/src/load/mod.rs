//! `llmesh load`: a load generator for the gateway (or generation directly, as the floor).
//!
//! The pipeline, one module per stage:
//! - [`args`]: flags, validated into a [`args::Plan`];
//! - [`workload`]: the prompt of each request (a weighted mix; optionally unique per request);
//! - [`client`]: the gRPC calls, over a few HTTP/2 connections in turn; [`http`]: the same load
//!   as OpenAI chat completions over HTTP/1.1 (`--protocol http`);
//! - [`runner`]: when calls start: an open loop on a timetable ([`schedule`], paced by [`pacer`]) or
//!   a closed loop of workers, then the grace period and the hard stop;
//! - [`recorder`]: HDR histograms and counters, fed by the finished calls ([`outcome`]), with a
//!   live [`progress`] bar on a terminal;
//! - [`report`]: the human summary and the JSON.

mod args;
mod client;
mod http;
mod outcome;
mod pacer;
mod progress;
mod recorder;
mod report;
mod runner;
mod schedule;
mod workload;

use std::{io::Write as _, sync::Arc};

use anyhow::Context as _;

pub use self::args::LoadArgs;
use self::{
    args::{JsonOut, Protocol},
    client::{CallSettings, GrpcCaller},
    http::HttpCaller,
    progress::{Goal, Progress},
    recorder::Recorder,
    report::Report,
    runner::Counters,
    workload::{PromptMix, Workload},
};

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    // Registered first: Ctrl-C from here on ends the run with a report instead of killing it.
    let stop = llmesh_common::shutdown::signal();
    let plan = args.plan()?;
    let mix = match &plan.prompts {
        Some(path) => PromptMix::from_file(path)?,
        None => PromptMix::seed(),
    };
    let prompt_count = mix.prompts().len();
    let workload = Workload::new(mix, plan.seed, plan.unique.then(|| fastrand::u64(..)));
    // Created before the run, so a bad path fails now rather than after it.
    let json_file = match &plan.json {
        Some(JsonOut::File(path)) => {
            Some((path, std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?))
        }
        _ => None,
    };
    let settings = CallSettings {
        model: plan.model.clone(),
        max_tokens: plan.max_tokens,
        stream: plan.stream,
        api_key: plan.api_key.clone(),
        timeout: plan.run.timeout,
    };
    let caller = Arc::new(match plan.protocol {
        Protocol::Grpc => {
            let channels = client::connect(&plan.target, plan.tls.as_ref(), plan.connections).await?;
            AnyCaller::Grpc(GrpcCaller::new(plan.service, channels, workload, settings))
        }
        Protocol::Http => {
            AnyCaller::Http(HttpCaller::connect(&plan.target, plan.tls.as_ref(), workload, settings).await?)
        }
    });
    tracing::info!(
        target = %plan.target,
        service = plan.service.grpc_name(),
        protocol = plan.protocol.name(),
        stream = plan.stream,
        model = %plan.model,
        prompts = prompt_count,
        seed = plan.seed,
        "sending load"
    );

    let counters = Arc::new(Counters::default());
    let goal = match (plan.run.requests, plan.run.duration) {
        (Some(n), _) => Goal::Requests(n),
        (None, duration) => Goal::Duration(duration.unwrap_or_default()),
    };
    let progress = Progress::new(goal, counters.clone());
    let (results_tx, results_rx) = tokio::sync::mpsc::unbounded_channel();
    let collector = tokio::spawn(progress::collect(results_rx, Recorder::new()?, progress));
    // On a runtime thread, not on `block_on`'s: the timer that paces the calls, the tasks that
    // make them and their connections then share one thread (with one worker, the thread the timer
    // woke starts the call), instead of handing every call from one thread to another — two
    // thread wake-ups a call, which cost the client about a third of its CPU at 10,000 req/s.
    let run_plan = plan.run;
    let summary = tokio::spawn(async move { runner::run(&run_plan, caller, results_tx, counters, stop).await })
        .await
        .context("the load runner failed")?;
    let recorder = collector.await.context("the recorder task failed")?;

    let report = Report::new(&plan, &summary, &recorder);
    if plan.json == Some(JsonOut::Stdout) {
        // stdout carries only the JSON, so it can be piped; the human summary goes to stderr.
        report.write_human(&mut std::io::stderr().lock())?;
        let mut out = std::io::stdout().lock();
        report.write_json(&mut out)?;
        out.flush()?;
    } else {
        let mut out = std::io::stdout().lock();
        report.write_human(&mut out)?;
        out.flush()?;
    }
    if let Some((path, file)) = json_file {
        let mut file = std::io::BufWriter::new(file);
        report
            .write_json(&mut file)
            .and_then(|()| Ok(file.flush()?))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The caller of either protocol.
enum AnyCaller {
    Grpc(GrpcCaller),
    Http(HttpCaller),
}

impl runner::Caller for AnyCaller {
    async fn call(&self, seq: u64) -> outcome::CallResult {
        match self {
            Self::Grpc(caller) => caller.call(seq).await,
            Self::Http(caller) => caller.call(seq).await,
        }
    }
}
