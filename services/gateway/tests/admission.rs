//! Admission against real peers: the GCRA script on a real `redis-server`, the limit shared by
//! two limiters, the local fallback when Redis dies or stalls, and the whole stack (auth, rate
//! limit, shed) in a real tonic server called over loopback.

// Test helpers outside `#[test]` functions fail loudly too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// In a module named after the file, so that `cargo test -p llmesh-gateway admission` runs these too.
mod admission {
    use std::{
        future::Future,
        pin::Pin,
        sync::Arc,
        time::{Duration, Instant},
    };

    use futures::{Stream, StreamExt as _};
    use llmesh_gateway::for_tests::admission::{
        AuthLayer, KeyStore, RateLimitConfig, RateLimitLayer, RateLimiter, ShedLayer, generate_key,
        rate_limit::{Cost, Limit, decision_from_reply, gcra},
    };
    use llmesh_gateway::principal::Principal;
    use llmesh_proto::generation::v1::{
        GenerateRequest, GenerateResponse, GenerateStreamRequest, GenerateStreamResponse, ListModelsRequest,
        ListModelsResponse,
        generation_client::GenerationClient,
        generation_server::{Generation, GenerationServer},
    };
    use llmesh_testkit::Redis;
    use tonic::{Code, Request, Response, Status};
    use tower::ServiceBuilder;

    /// Every test finishes within this, whatever happens.
    const TEST_LIMIT: Duration = Duration::from_secs(60);

    async fn bounded<T>(test: impl Future<Output = T>) -> T {
        tokio::time::timeout(TEST_LIMIT, test).await.expect("test took too long")
    }

    /// A `redis-server` of the test's own (the workspace's fixture), killed when dropped.
    async fn start_redis() -> Redis {
        Redis::start().await.unwrap()
    }

    fn principal(id: &str) -> Principal {
        Principal { id: id.into(), ..Principal::anonymous() }
    }

    fn config(redis: &Redis, requests_per_minute: u32, redis_timeout_ms: u64) -> RateLimitConfig {
        RateLimitConfig { redis_url: Some(redis.url()), requests_per_minute, tokens_per_minute: 0, redis_timeout_ms }
    }

    /// Checks until Redis (not the local limiter) decided, or fails after `within`.
    /// Takes a request from each limiter in turn until both refuse; returns how many were admitted,
    /// counting on from `spent`. Past `at_most`, the burst never ran out: the test fails.
    async fn spend_from_both(
        limiters: &[Arc<RateLimiter>; 2],
        key: &Principal,
        mut spent: usize,
        at_most: usize,
    ) -> usize {
        loop {
            let a = limiters[0].check_request(key).await.is_ok();
            let b = limiters[1].check_request(key).await.is_ok();
            spent += usize::from(a) + usize::from(b);
            if !a && !b {
                return spent;
            }
            assert!(spent <= at_most, "the burst never ran out");
        }
    }

    async fn until_redis_decides(limiter: &RateLimiter, principal: &Principal, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let before = limiter.local_fallbacks();
            let _ = limiter.check_request(principal).await;
            if limiter.local_fallbacks() == before && limiter.redis_healthy() {
                return;
            }
            assert!(Instant::now() < deadline, "Redis was not used again within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_lua_script_computes_what_the_rust_function_does() {
        bounded(async {
            let redis = start_redis().await;
            let mut conn = redis.connection().await.unwrap();
            let script = redis::Script::new(gcra::SCRIPT);
            let mut rng = fastrand::Rng::with_seed(20261101);
            let (mut allowed, mut refused, mut refunds, mut forced) = (0, 0, 0, 0);
            for per_minute in [1, 7, 600, 60_000, 7_000_000] {
                let limit = Limit::per_minute(per_minute).unwrap();
                let key = format!("test:gcra:{per_minute}");
                for _ in 0..200 {
                    let most = limit.burst / 3 + 1;
                    let cost = match rng.u8(0..10) {
                        0 => Cost::Refund(rng.u32(0..=most)),
                        1 => Cost::Force(rng.u32(0..=most)),
                        _ => Cost::Take(rng.u32(0..=most)),
                    };
                    let before: Option<u64> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
                    let (amount, force) = cost.as_args();
                    let reply: [i64; 5] = script
                        .key(&key)
                        .arg(u64::try_from(limit.interval.as_nanos()).unwrap())
                        .arg(limit.burst)
                        .arg(amount)
                        .arg(force)
                        .invoke_async(&mut conn)
                        .await
                        .unwrap();
                    let now = u64::try_from(reply[4]).unwrap();
                    let expected = limit.decide(before.unwrap_or(0), now, cost);
                    assert_eq!(decision_from_reply(reply), Some(expected), "{cost:?} at {now} after {before:?}");

                    let after: Option<u64> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
                    if !expected.allowed {
                        assert_eq!(after, before, "a refusal stores nothing");
                        refused += 1;
                    } else {
                        assert_eq!(after, (expected.new_tat > now).then_some(expected.new_tat));
                        allowed += 1;
                        refunds += usize::from(matches!(cost, Cost::Refund(_)));
                        forced += usize::from(matches!(cost, Cost::Force(_)));
                    }
                }
            }
            // Every branch was compared, not just the easy one.
            assert!(
                allowed > 200 && refused > 50 && refunds > 20 && forced > 20,
                "{allowed} {refused} {refunds} {forced}"
            );

            // Keys expire once their bucket is full again (when the TAT is reached), so idle keys cost
            // nothing.
            let key = "test:gcra:ttl";
            let limit = Limit::per_minute(600).unwrap();
            let reply: [i64; 5] = script
                .key(key)
                .arg(100_000_000u64)
                .arg(limit.burst)
                .arg(300)
                .arg(0)
                .invoke_async(&mut conn)
                .await
                .unwrap();
            let until_full_ms = (reply[1] - reply[4]) / 1000;
            assert_eq!(until_full_ms, 30_000);
            let ttl: i64 = redis::cmd("PTTL").arg(key).query_async(&mut conn).await.unwrap();
            assert!((until_full_ms - 100..=until_full_ms + 1).contains(&ttl), "{ttl}");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_limiters_sharing_redis_enforce_one_limit() {
        bounded(async {
            let redis = start_redis().await;
            // 1200 a minute: 20 a second between the two, after a burst of 1200.
            let config = config(&redis, 1_200, 250);
            let limiters = [Arc::new(RateLimiter::new(&config).unwrap()), Arc::new(RateLimiter::new(&config).unwrap())];
            let key = principal("shared");

            // Spend the burst, from both.
            let spending = Instant::now();
            let spent = spend_from_both(&limiters, &key, 0, 1_300).await;
            // The burst, plus what flowed back (20 a second) while it was being spent: how long that
            // took depends on the machine, so the bound is computed from the time measured.
            let refilled = (spending.elapsed().as_secs_f64() * 20.0).ceil() as usize;
            assert!((1_200..=1_202 + refilled).contains(&spent), "{spent} spent, {refilled} refilled");

            // Then 400 calls a second (200 from each), for 3 seconds: 20 a second get through.
            let start = Instant::now();
            let window = Duration::from_secs(3);
            let tasks = limiters.clone().map(|limiter| {
                let key = key.clone();
                tokio::spawn(async move {
                    let mut allowed = 0u32;
                    while start.elapsed() < window {
                        allowed += u32::from(limiter.check_request(&key).await.is_ok());
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    allowed
                })
            });
            let mut per_limiter = Vec::new();
            for task in tasks {
                per_limiter.push(task.await.unwrap());
            }
            let elapsed = start.elapsed().as_secs_f64();
            let total = f64::from(per_limiter.iter().sum::<u32>());
            let expected = 20.0 * elapsed;
            assert!(
                total >= expected * 0.9 && total <= expected * 1.1 + 1.0,
                "{total} allowed in {elapsed:.2} s ({per_limiter:?}); the shared limit allows {expected:.1}"
            );
            assert!(per_limiter.iter().all(|&n| n > 0), "both limiters were served: {per_limiter:?}");
            assert_eq!(limiters[0].local_fallbacks() + limiters[1].local_fallbacks(), 0, "Redis decided every call");
        })
        .await;
    }

    /// Scripts Redis has run so far.
    async fn scripts_run(redis: &Redis) -> u64 {
        let mut conn = redis.connection().await.unwrap();
        let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
        info.lines()
            .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
            .filter_map(|line| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
            .sum()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_keys_lease_slices_and_still_keep_one_limit() {
        bounded(async {
            let redis = start_redis().await;
            // 12,000 a minute (200 a second): slices of up to 64 requests (1% is 120).
            let config = config(&redis, 12_000, 250);
            let limiters = [Arc::new(RateLimiter::new(&config).unwrap()), Arc::new(RateLimiter::new(&config).unwrap())];
            let key = principal("busy");
            until_redis_decides(&limiters[0], &key, Duration::from_secs(5)).await;
            until_redis_decides(&limiters[1], &key, Duration::from_secs(5)).await;
            let scripts_before = scripts_run(&redis).await;
            let spending = Instant::now();
            let spent = spend_from_both(&limiters, &key, 2, 14_000).await;
            let scripts = scripts_run(&redis).await - scripts_before;
            // The burst and what flowed back while it was spent (200 a second), and never more:
            // every leased request was taken in Redis first. Slices held back at the end (at most
            // one per limiter) may leave the count short of that by two slices.
            let refilled = (spending.elapsed().as_secs_f64() * 200.0).ceil() as usize;
            assert!((12_000 - 128..=12_002 + refilled).contains(&spent), "{spent} spent, {refilled} refilled");
            // One Redis call admitted a slice of calls, not one.
            assert!(scripts * 10 < spent as u64, "{scripts} scripts run for {spent} calls");
            assert_eq!(limiters[0].local_fallbacks() + limiters[1].local_fallbacks(), 0, "Redis decided every call");
        })
        .await;
    }

    #[tokio::test]
    async fn redis_killed_then_back_falls_back_locally_then_shares_again() {
        bounded(async {
            let mut redis = start_redis().await;
            let port = redis.port;
            let limiter = RateLimiter::new(&config(&redis, 600, 50)).unwrap();
            let key = principal("fallback");
            until_redis_decides(&limiter, &key, Duration::from_secs(5)).await;
            assert_eq!(limiter.local_fallbacks(), 0);

            redis.kill().await;
            let start = Instant::now();
            let quota = limiter.check_request(&key).await.unwrap();
            assert!(start.elapsed() < Duration::from_millis(50 + 200), "took {:?}", start.elapsed());
            assert_eq!(quota.remaining_requests, Some(599), "the local limiter starts from a full bucket");
            assert_eq!(limiter.local_fallbacks(), 1);
            assert!(!limiter.redis_healthy());

            // While Redis is down, calls do not wait for it each time.
            let start = Instant::now();
            for _ in 0..100 {
                limiter.check_request(&key).await.unwrap();
            }
            assert!(start.elapsed() < Duration::from_millis(500), "took {:?}", start.elapsed());
            assert_eq!(limiter.local_fallbacks(), 101);

            // Redis back on the same port: used again, without anyone doing anything.
            let redis = Redis::start_on(port).await.unwrap();
            until_redis_decides(&limiter, &key, Duration::from_secs(5)).await;
            let fallbacks = limiter.local_fallbacks();
            for _ in 0..20 {
                limiter.check_request(&key).await.unwrap();
            }
            assert_eq!(limiter.local_fallbacks(), fallbacks);
            let mut conn = redis.connection().await.unwrap();
            let tat: Option<u64> =
                redis::cmd("GET").arg("llmesh:ratelimit:requests:fallback").query_async(&mut conn).await.unwrap();
            assert!(tat.is_some(), "the limit lives in Redis again");
        })
        .await;
    }

    #[tokio::test]
    async fn a_stalled_redis_is_given_up_on_after_the_timeout() {
        bounded(async {
            let redis = start_redis().await;
            let limiter = RateLimiter::new(&config(&redis, 600, 50)).unwrap();
            let key = principal("stalled");
            until_redis_decides(&limiter, &key, Duration::from_secs(5)).await;

            // Redis stops answering everyone for a second.
            let mut admin = redis.connection().await.unwrap();
            let () = redis::cmd("CLIENT").arg("PAUSE").arg(1_000).arg("ALL").query_async(&mut admin).await.unwrap();
            let start = Instant::now();
            limiter.check_request(&key).await.unwrap();
            let elapsed = start.elapsed();
            assert!(elapsed >= Duration::from_millis(45) && elapsed < Duration::from_millis(250), "took {elapsed:?}");
            assert_eq!(limiter.local_fallbacks(), 1);
            assert!(limiter.redis_healthy(), "one slow answer is not an outage");

            // Still no answer after 250 ms of timeouts: Redis is down, calls stop waiting for it.
            let mut slow_calls: u64 = 1;
            while limiter.redis_healthy() && slow_calls < 40 {
                limiter.check_request(&key).await.unwrap();
                slow_calls += 1;
            }
            assert!(!limiter.redis_healthy(), "{slow_calls} calls timed out and Redis was not given up on");
            assert!(start.elapsed() >= Duration::from_millis(250), "given up on after {:?}", start.elapsed());
            assert_eq!(limiter.local_fallbacks(), slow_calls);
            let start = Instant::now();
            limiter.check_request(&key).await.unwrap();
            assert!(start.elapsed() < Duration::from_millis(45), "took {:?} while Redis was down", start.elapsed());

            until_redis_decides(&limiter, &key, Duration::from_secs(5)).await;
            assert!(limiter.redis_healthy());
        })
        .await;
    }

    #[tokio::test]
    async fn a_limiter_whose_redis_is_down_from_the_start_still_starts() {
        bounded(async {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let config = RateLimitConfig {
                redis_url: Some(format!("redis://127.0.0.1:{port}/")),
                requests_per_minute: 2,
                tokens_per_minute: 0,
                redis_timeout_ms: 20,
            };
            let limiter = RateLimiter::new(&config).unwrap();
            let key = principal("early");
            assert!(limiter.check_request(&key).await.is_ok());
            assert!(limiter.check_request(&key).await.is_ok());
            let status = limiter.check_request(&key).await.unwrap_err().into_status();
            assert_eq!(status.code(), Code::ResourceExhausted);
            assert_eq!(limiter.local_fallbacks(), 3);
            // A refused connection is an outage at once; a connection attempt that outlasts the
            // timeout, once that has gone on for 250 ms.
            for _ in 0..40 {
                if !limiter.redis_healthy() {
                    break;
                }
                let _ = limiter.check_request(&key).await;
            }
            assert!(!limiter.redis_healthy());
        })
        .await;
    }

    /// A stand-in for the gateway's RPCs: `Generate` answers with the caller's principal id,
    /// `GenerateStream` sends one chunk and then stays open.
    struct Echo;

    type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

    #[tonic::async_trait]
    impl Generation for Echo {
        async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
            let principal = request.extensions().get::<Principal>().ok_or_else(|| Status::internal("no principal"))?;
            Ok(Response::new(GenerateResponse { text: principal.id.to_string(), ..GenerateResponse::default() }))
        }

        type GenerateStreamStream = ChunkStream;

        async fn generate_stream(&self, _: Request<GenerateStreamRequest>) -> Result<Response<ChunkStream>, Status> {
            let first = futures::stream::once(async { Ok(GenerateStreamResponse::default()) });
            Ok(Response::new(Box::pin(first.chain(futures::stream::pending()))))
        }

        async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
            Ok(Response::new(ListModelsResponse::default()))
        }
    }

    fn with_key<T>(message: T, key: &str) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert("x-api-key", key.parse().unwrap());
        request
    }

    #[tokio::test]
    async fn the_stack_in_a_real_server() {
        bounded(async {
            let (limited_key, mut limited) = generate_key("limited");
            limited.requests_per_minute = Some(3);
            let (free_key, free) = generate_key("free");
            let keys = Arc::new(KeyStore::from_keys([limited, free]).unwrap());
            let limiter = Arc::new(RateLimiter::new(&RateLimitConfig::default()).unwrap());
            let shed = ShedLayer::new(&llmesh_gateway::for_tests::admission::ShedConfig {
                max_concurrency: 1,
                max_in_flight_per_key: 0,
            });

            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .layer(
                        ServiceBuilder::new()
                            .layer(AuthLayer::new(keys))
                            .layer(RateLimitLayer::new(limiter))
                            .layer(shed.clone()),
                    )
                    .add_service(GenerationServer::new(Echo))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
            );
            let mut client = GenerationClient::connect(format!("http://{address}")).await.unwrap();

            // Auth.
            let status = client.generate(GenerateRequest::default()).await.unwrap_err();
            assert_eq!((status.code(), status.message()), (Code::Unauthenticated, "missing x-api-key"));
            let (stranger, _) = generate_key("stranger");
            let status = client.generate(with_key(GenerateRequest::default(), &stranger)).await.unwrap_err();
            assert_eq!((status.code(), status.message()), (Code::Unauthenticated, "unknown API key"));
            let response = client.generate(with_key(GenerateRequest::default(), &free_key)).await.unwrap();
            assert_eq!(response.get_ref().text, "free");
            assert!(response.metadata().get("x-ratelimit-remaining-requests").is_none(), "no request limit");

            // Rate limit: 3 a minute for this key.
            for remaining in ["2", "1", "0"] {
                let response = client.generate(with_key(GenerateRequest::default(), &limited_key)).await.unwrap();
                assert_eq!(response.get_ref().text, "limited");
                assert_eq!(response.metadata().get("x-ratelimit-remaining-requests").unwrap(), remaining);
            }
            let status = client.generate(with_key(GenerateRequest::default(), &limited_key)).await.unwrap_err();
            assert_eq!(status.code(), Code::ResourceExhausted);
            assert_eq!(status.message(), "rate limit: 3 requests per minute for key limited");
            let wait: u64 = status.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
            assert!((19_000..=20_000).contains(&wait), "{wait}");
            assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap().to_str().unwrap(), wait.to_string());

            // Shed: one call in flight at a time, and an open stream is one.
            let mut stream = client
                .generate_stream(with_key(GenerateStreamRequest::default(), &free_key))
                .await
                .unwrap()
                .into_inner();
            stream.message().await.unwrap().unwrap();
            assert_eq!(shed.in_flight(), 1);
            let status = client.generate(with_key(GenerateRequest::default(), &free_key)).await.unwrap_err();
            assert_eq!((status.code(), status.message()), (Code::ResourceExhausted, "overloaded: 1 calls in flight"));
            assert_eq!(shed.shed_count(), 1);

            // The client cancels the stream: its place is free again.
            drop(stream);
            let deadline = Instant::now() + Duration::from_secs(5);
            while shed.in_flight() > 0 {
                assert!(Instant::now() < deadline, "the cancelled stream kept its permit");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            client.generate(with_key(GenerateRequest::default(), &free_key)).await.unwrap();
            assert_eq!(shed.in_flight(), 0);

            server.abort();
        })
        .await;
    }
}
