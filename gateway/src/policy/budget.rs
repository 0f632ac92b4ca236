//! Token budgets (`LLMTokenBudget`), charged before a request is forwarded.
//!
//! A request reserves the most it can cost in every budget that applies to
//! it: its prompt bounded by the size of its body (a token is at least one
//! byte, and JSON adds more than a chat template's per-message tokens) plus
//! the completion it allows (`max_tokens`, or the budget's
//! `defaultMaxTokens`, which the gateway then sends as the request's limit).
//! The reservation is atomic across budgets and replicas; it is trued up to
//! the usage the provider reports, and released when nothing was served. So
//! concurrent and streamed calls can never spend more than a budget holds.
//!
//! Windows are fixed and aligned to the Unix epoch: every replica computes
//! the same window from its clock.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use llm_egress_config::{
    budget::{parse_window, BudgetKey, BudgetSelector, LlmTokenBudgetSpec, DEFAULT_MAX_TOKENS},
    resources::Named,
};

use crate::{
    llm::{
        endpoint::Operation,
        json,
        provider::{self, AdaptError},
    },
    metrics::{BudgetLabels, BudgetRefusalLabels, Metrics},
    policy::authz::value_matches,
};

/// One budget as the gateway enforces it.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// `namespace/name`.
    pub id: String,
    selector: BudgetSelector,
    /// A tenant's budget limits its own namespace's workloads only.
    only_namespace: Option<String>,
    models: Vec<String>,
    pub tokens: u64,
    window: Duration,
    per: BudgetKey,
    pub default_max_tokens: u64,
}

impl Budget {
    /// `None` for a budget validation rejected (never reached here).
    pub fn compile(b: &Named<LlmTokenBudgetSpec>, trusted: bool) -> Option<Budget> {
        let window = parse_window(&b.spec.window).ok()?;
        Some(Budget {
            id: format!("{}/{}", b.meta.namespace(), b.meta.name),
            selector: b.spec.selector.clone(),
            only_namespace: (!trusted).then(|| b.meta.namespace().to_string()),
            models: b.spec.models.clone(),
            tokens: b.spec.tokens,
            window,
            per: b.spec.per,
            default_max_tokens: b.spec.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        })
    }

    fn applies(&self, caller: &Caller, model: Option<&str>) -> bool {
        let any = |patterns: &[String], value: Option<&str>| {
            patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| value_matches(p, v)))
        };
        let s = &self.selector;
        self.only_namespace
            .as_deref()
            .is_none_or(|ns| caller.namespace == Some(ns))
            && any(&s.principals, caller.principal)
            && any(&s.namespaces, caller.namespace)
            && any(&s.request_principals, caller.request_principal)
            && any(&self.models, model)
    }

    /// Whose counter a caller's tokens go to.
    fn key(&self, caller: &Caller) -> String {
        match self.per {
            BudgetKey::Principal => caller.principal.unwrap_or("-").to_string(),
            BudgetKey::RequestPrincipal => caller.request_principal.unwrap_or("-").to_string(),
            BudgetKey::Budget => "*".to_string(),
        }
    }

    /// The current window: its index and when it ends.
    fn window_at(&self, now: SystemTime) -> (u64, SystemTime) {
        let secs = self.window.as_secs().max(1);
        let index = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / secs;
        (index, UNIX_EPOCH + Duration::from_secs((index + 1) * secs))
    }
}

/// Who is calling, as the budgets' selectors see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub request_principal: Option<&'a str>,
}

/// The most a request can cost, read from its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    pub model: Option<String>,
    /// Bound of the prompt's tokens: the body's bytes.
    pub prompt: u64,
    /// The completion the request allows (`None`: it sets no limit).
    pub completion_limit: Option<u64>,
    /// Whether this operation generates output at all.
    pub generates: bool,
}

/// The request fields that limit a completion, per operation.
fn limit_fields(operation: Operation) -> &'static [&'static str] {
    match operation {
        Operation::Chat => &["max_completion_tokens", "max_tokens"],
        Operation::TextCompletion => &["max_tokens"],
        Operation::Responses => &["max_output_tokens"],
        _ => &[],
    }
}

/// The field the gateway sets when a request has no limit.
pub fn limit_field(operation: Operation) -> Option<&'static str> {
    match operation {
        Operation::Chat | Operation::TextCompletion => Some("max_tokens"),
        Operation::Responses => Some("max_output_tokens"),
        _ => None,
    }
}

impl Cost {
    /// Reads what a request may cost. The fields it prices must be positive
    /// whole numbers or null, given once and spelled exactly: a provider that
    /// reads `"100000"`, `1e5` or a second key as a limit would otherwise
    /// generate past a reservation made without it.
    pub fn of(body: &[u8], operation: Operation) -> Result<Cost, AdaptError> {
        const NAMES: [&str; 6] = [
            "model",
            "n",
            "best_of",
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
        ];
        let fields = json::top_level(body, NAMES.map(Some), &provider::GUARDED)
            .map_err(|_| provider::not_an_object(body))?;
        if let Some(g) = fields.ambiguous {
            return Err(AdaptError::Ambiguous(provider::GUARDED[g]));
        }
        let count = |name: &'static str| -> Result<Option<u64>, AdaptError> {
            let given = NAMES
                .iter()
                .position(|n| *n == name)
                .and_then(|i| fields.values[i].as_ref());
            match given {
                None | Some(serde_json::Value::Null) => Ok(None),
                // Zero too: a provider that reads 0 as "not set" (Go's
                // omitempty, Python's `if max_tokens:`) would use its own.
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(Some)
                    .ok_or(AdaptError::NotCount(name)),
            }
        };
        // The largest limit: providers differ in which field they honour.
        // Each of `n` (or `best_of`) choices may reach it.
        let choices = count("n")?.max(count("best_of")?).unwrap_or(1).max(1);
        let mut completion_limit = None;
        for field in limit_fields(operation) {
            completion_limit = completion_limit.max(count(field)?);
        }
        Ok(Cost {
            model: fields.values[0]
                .as_ref()
                .and_then(|m| m.as_str())
                .map(str::to_string),
            prompt: body.len() as u64,
            completion_limit: completion_limit.map(|n| n.saturating_mul(choices)),
            generates: limit_field(operation).is_some(),
        })
    }
}

/// What the budgets say about a request.
pub enum Admission {
    /// No budget applies.
    Free,
    /// Reserved; `inject_limit` is the completion limit the gateway must
    /// send when the request set none.
    Reserved {
        reservation: Reservation,
        completion_limit: u64,
        inject_limit: Option<u64>,
    },
    /// It does not fit (yet).
    Refused {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The budget store cannot be reached and the gateway fails closed.
    Unavailable { message: String },
}

/// Where counters live: this process, or Redis shared by the replicas.
pub enum Store {
    Local(Mutex<HashMap<String, (u64, SystemTime)>>),
    Redis(RedisStore),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the budget store (Redis) did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the budget store (Redis) failed: {0}")]
    Redis(String),
}

/// One counter a reservation holds.
#[derive(Debug, Clone)]
struct Slot {
    budget: String,
    key: String,
    limit: u64,
    window_end: SystemTime,
}

/// Local counters are dropped once their window is over, checked this often.
const LOCAL_PRUNE_AT: usize = 4096;

impl Store {
    /// Adds `amount` to every slot if it fits in all of them; else the
    /// index of a slot it does not fit and that slot's use.
    async fn reserve(&self, slots: &[Slot], amount: u64) -> Result<Result<(), (usize, u64)>, StoreError> {
        match self {
            Store::Local(counters) => {
                let mut c = counters.lock().unwrap_or_else(|p| p.into_inner());
                if c.len() > LOCAL_PRUNE_AT {
                    let now = SystemTime::now();
                    c.retain(|_, (_, end)| *end > now);
                }
                for (i, s) in slots.iter().enumerate() {
                    let used = c.get(&s.key).map_or(0, |(u, _)| *u);
                    if used.saturating_add(amount) > s.limit {
                        return Ok(Err((i, used)));
                    }
                }
                for s in slots {
                    c.entry(s.key.clone()).or_insert((0, s.window_end)).0 += amount;
                }
                Ok(Ok(()))
            }
            Store::Redis(r) => r.reserve(slots, amount).await,
        }
    }

    /// Adds `delta` (negative: gives back) to every slot still current.
    async fn adjust(&self, slots: &[Slot], delta: i64) -> Result<(), StoreError> {
        match self {
            Store::Local(counters) => {
                let mut c = counters.lock().unwrap_or_else(|p| p.into_inner());
                for s in slots {
                    if let Some((used, _)) = c.get_mut(&s.key) {
                        *used = used.saturating_add_signed(delta);
                    }
                }
                Ok(())
            }
            Store::Redis(r) => r.adjust(slots, delta).await,
        }
    }
}

/// Checks every slot, then adds to all of them: atomic in Redis.
const RESERVE_LUA: &str = r#"
local amount = tonumber(ARGV[1])
local n = #KEYS
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used + amount > tonumber(ARGV[1 + i]) then
    return {0, i, used}
  end
end
for i = 1, n do
  redis.call('INCRBY', KEYS[i], amount)
  redis.call('PEXPIREAT', KEYS[i], ARGV[1 + n + i])
end
return {1, 0, 0}
"#;

/// A true-up; a window that is over (its key expired) is left alone.
const ADJUST_LUA: &str = r#"
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('INCRBY', KEYS[i], ARGV[1]) < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
    end
  end
end
return 1
"#;

/// Budgets shared by the replicas through Redis.
pub struct RedisStore {
    connection: redis::aio::ConnectionManager,
    timeout: Duration,
    reserve: redis::Script,
    adjust: redis::Script,
}

/// Redis keeps a window's counter a little past its end (clock skew).
const WINDOW_GRACE: Duration = Duration::from_secs(60);

impl RedisStore {
    /// Connects lazily: the gateway starts while Redis is down.
    pub fn new(url: &str, timeout: Duration) -> Result<RedisStore, StoreError> {
        // The URL may carry a password: never echo it.
        let client = redis::Client::open(url).map_err(|e| {
            StoreError::Redis(format!(
                "invalid URL ({:?}); expected redis://[:PASSWORD@]HOST[:PORT][/DB]",
                e.kind()
            ))
        })?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(timeout);
        let connection = redis::aio::ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        Ok(RedisStore {
            connection,
            timeout,
            reserve: redis::Script::new(RESERVE_LUA),
            adjust: redis::Script::new(ADJUST_LUA),
        })
    }

    fn key(slot: &Slot) -> String {
        format!("llm-egress:budget:{}", slot.key)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut con = self.connection.clone();
        match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut con)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(e.to_string())),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    async fn reserve(&self, slots: &[Slot], amount: u64) -> Result<Result<(), (usize, u64)>, StoreError> {
        let mut inv = self.reserve.prepare_invoke();
        inv.arg(amount);
        for s in slots {
            inv.key(Self::key(s));
        }
        for s in slots {
            inv.arg(s.limit);
        }
        for s in slots {
            let expire = (s.window_end + WINDOW_GRACE)
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64;
            inv.arg(expire);
        }
        let (ok, index, used): (i64, usize, i64) = self.run(inv).await?;
        Ok(if ok == 1 {
            Ok(())
        } else {
            Err((index.saturating_sub(1), used.max(0) as u64))
        })
    }

    async fn adjust(&self, slots: &[Slot], delta: i64) -> Result<(), StoreError> {
        let mut inv = self.adjust.prepare_invoke();
        inv.arg(delta);
        for s in slots {
            inv.key(Self::key(s));
        }
        self.run::<i64>(inv).await.map(|_| ())
    }
}

/// The budget store and what to do without it.
pub struct Budgets {
    store: Store,
    /// Serve requests unbudgeted when the store cannot be reached.
    fail_open: bool,
    metrics: Arc<Metrics>,
}

fn seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Budgets {
    pub fn new(store: Store, fail_open: bool, metrics: Arc<Metrics>) -> Arc<Budgets> {
        Arc::new(Budgets {
            store,
            fail_open,
            metrics,
        })
    }

    #[cfg(test)]
    pub fn local(metrics: Arc<Metrics>) -> Arc<Budgets> {
        Budgets::new(Store::Local(Mutex::new(HashMap::new())), false, metrics)
    }

    fn refused(&self, budget: &str, reason: &'static str) {
        self.metrics
            .budget_refused
            .get_or_create(&BudgetRefusalLabels {
                budget: budget.to_string(),
                reason,
            })
            .inc();
    }

    /// Reserves `cost` in every budget of `budgets` that applies, or says
    /// why not.
    pub async fn admit(self: &Arc<Self>, budgets: &[Budget], caller: &Caller<'_>, cost: &Cost) -> Admission {
        let applicable: Vec<&Budget> = budgets
            .iter()
            .filter(|b| b.applies(caller, cost.model.as_deref()))
            .collect();
        if applicable.is_empty() {
            return Admission::Free;
        }
        let (completion_limit, inject_limit) = match (cost.generates, cost.completion_limit) {
            (false, _) => (0, None),
            (true, Some(n)) => (n, None),
            (true, None) => {
                let n = applicable
                    .iter()
                    .map(|b| b.default_max_tokens)
                    .min()
                    .unwrap_or(DEFAULT_MAX_TOKENS);
                (n, Some(n))
            }
        };
        let amount = cost.prompt.saturating_add(completion_limit);
        if let Some(b) = applicable.iter().find(|b| amount > b.tokens) {
            self.refused(&b.id, "too_large");
            return Admission::Refused {
                message: format!(
                    "Request too large for token budget {}: it may take up to {amount} tokens (prompt up to {}, completion up to {completion_limit}), and the budget allows {} per {} s; lower max_tokens or shorten the request",
                    b.id,
                    cost.prompt,
                    b.tokens,
                    b.window.as_secs()
                ),
                retry_after: None,
            };
        }
        let now = SystemTime::now();
        let slots: Vec<Slot> = applicable
            .iter()
            .map(|b| {
                let (index, window_end) = b.window_at(now);
                Slot {
                    budget: b.id.clone(),
                    key: format!("{}:{}:{index}", b.id, b.key(caller)),
                    limit: b.tokens,
                    window_end,
                }
            })
            .collect();
        match self.store.reserve(&slots, amount).await {
            Ok(Ok(())) => {
                for s in &slots {
                    self.metrics
                        .budget_reserved
                        .get_or_create(&BudgetLabels {
                            budget: s.budget.clone(),
                        })
                        .inc_by(amount);
                }
                Admission::Reserved {
                    reservation: Reservation {
                        budgets: self.clone(),
                        slots,
                        reserved: amount,
                        prompt: cost.prompt,
                        sent: false,
                        settled: false,
                    },
                    completion_limit,
                    inject_limit,
                }
            }
            Ok(Err((i, used))) => {
                let s = &slots[i];
                self.refused(&s.budget, "exhausted");
                let wait = s.window_end.duration_since(now).unwrap_or_default();
                Admission::Refused {
                    message: format!(
                        "Token budget {} exhausted: {used} of {} tokens used in this window, and this request may take up to {amount}; retry after {} s",
                        s.budget,
                        s.limit,
                        seconds(wait)
                    ),
                    retry_after: Some(wait),
                }
            }
            Err(e) => {
                self.metrics.budget_store_errors.inc();
                tracing::warn!(error = %e, fail_open = self.fail_open, "token budget store unavailable");
                if self.fail_open {
                    for s in &slots {
                        self.refused(&s.budget, "store_unavailable_fail_open");
                    }
                    Admission::Free
                } else {
                    for s in &slots {
                        self.refused(&s.budget, "store_unavailable");
                    }
                    Admission::Unavailable {
                        message: "token budgets cannot be checked right now (the budget store is unreachable); retry shortly".into(),
                    }
                }
            }
        }
    }
}

/// Tokens held for one request. Dropped without `settle`, it is given
/// back if no provider had the request yet, else charged in full (the
/// provider may bill what it was sent, whatever became of its answer).
pub struct Reservation {
    budgets: Arc<Budgets>,
    slots: Vec<Slot>,
    reserved: u64,
    prompt: u64,
    sent: bool,
    settled: bool,
}

impl Reservation {
    /// The bound of the prompt's tokens this reservation holds.
    pub fn prompt(&self) -> u64 {
        self.prompt
    }

    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Whether a provider may have the request (and bill it).
    pub fn mark_sent(&mut self, sent: bool) {
        self.sent = sent;
    }

    /// Charges `spent` tokens: gives back what was reserved beyond it (or
    /// takes more, if a provider reported more than its limit allowed).
    pub fn settle(mut self, spent: u64) {
        self.finish(spent);
    }

    fn finish(&mut self, spent: u64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        for s in &self.slots {
            self.budgets
                .metrics
                .budget_charged
                .get_or_create(&BudgetLabels {
                    budget: s.budget.clone(),
                })
                .inc_by(spent);
        }
        // A hostile usage report must not wrap the counters.
        let delta = i64::try_from(spent)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(self.reserved).unwrap_or(i64::MAX));
        if delta == 0 {
            return;
        }
        let budgets = self.budgets.clone();
        let slots = std::mem::take(&mut self.slots);
        let adjust = async move {
            if let Err(e) = budgets.store.adjust(&slots, delta).await {
                budgets.metrics.budget_store_errors.inc();
                tracing::warn!(error = %e, delta, "token budget true-up failed; the window keeps the reservation");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(adjust);
            }
            Err(_) => tracing::warn!("token budget true-up outside the runtime; dropped"),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.finish(if self.sent { self.reserved } else { 0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(yaml: &str, trusted: bool) -> Vec<Budget> {
        let mut set = llm_egress_config::resources::ResourceSet::default();
        let problems = set.add_text(std::path::Path::new("b.yaml"), yaml);
        assert!(problems.is_empty(), "{problems:?}");
        set.budgets
            .iter()
            .filter_map(|b| Budget::compile(b, trusted))
            .collect()
    }

    fn budget(spec: &str, ns: &str) -> String {
        format!("apiVersion: llm-egress.io/v1alpha1\nkind: LLMTokenBudget\nmetadata: {{name: b, namespace: {ns}}}\nspec:\n{spec}\n---\n")
    }

    const A: Caller = Caller {
        principal: Some("cluster.local/ns/team-a/sa/app"),
        namespace: Some("team-a"),
        request_principal: None,
    };
    const B: Caller = Caller {
        principal: Some("cluster.local/ns/team-b/sa/app"),
        namespace: Some("team-b"),
        request_principal: None,
    };

    fn cost(prompt: u64, limit: Option<u64>) -> Cost {
        Cost {
            model: Some("qwen-turbo".into()),
            prompt,
            completion_limit: limit,
            generates: true,
        }
    }

    #[tokio::test]
    async fn reservations_never_exceed_the_budget_and_are_per_principal() {
        let b = budgets(&budget("  tokens: 100\n  window: 1h", "istio-system"), true);
        let store = Budgets::local(Arc::new(Metrics::new()));
        let mut held = Vec::new();
        for _ in 0..3 {
            match store.admit(&b, &A, &cost(10, Some(20))).await {
                Admission::Reserved { reservation, .. } => held.push(reservation),
                _ => panic!("30 of 100 fits"),
            }
        }
        // 90 held: another 30 does not fit, for A; B has its own.
        match store.admit(&b, &A, &cost(10, Some(20))).await {
            Admission::Refused { retry_after, message } => {
                assert!(
                    retry_after.is_some_and(|d| d <= Duration::from_secs(3600)),
                    "{message}"
                );
                assert!(message.contains("90 of 100"), "{message}");
            }
            _ => panic!("over budget"),
        }
        assert!(matches!(
            store.admit(&b, &B, &cost(10, Some(20))).await,
            Admission::Reserved { .. }
        ));
        // A settles one at 5 tokens: 25 come back, and 30 fits again.
        held.pop().unwrap().settle(5);
        tokio::task::yield_now().await;
        assert!(matches!(
            store.admit(&b, &A, &cost(10, Some(20))).await,
            Admission::Reserved { .. }
        ));
        // Dropped unsettled before any provider had it: given back. Dropped
        // after it was sent (the client left, a timeout): charged in full.
        // So 5 (settled) + 30 (sent) are used, and two more fit, not three.
        let mut sent = held.pop().unwrap();
        sent.mark_sent(true);
        drop(sent);
        drop(held);
        tokio::task::yield_now().await;
        let c = cost(10, Some(20));
        let admit = || store.admit(&b, &A, &c);
        let (Admission::Reserved { reservation: k1, .. }, Admission::Reserved { reservation: k2, .. }) =
            (admit().await, admit().await)
        else {
            panic!("35 + 60 fits in 100");
        };
        assert!(
            matches!(admit().await, Admission::Refused { .. }),
            "95 + 30 does not"
        );
        let kept = (k1, k2);
        drop(kept);
    }

    #[tokio::test]
    async fn no_limit_reserves_and_injects_the_default() {
        let b = budgets(
            &budget(
                "  tokens: 100\n  window: 1m\n  defaultMaxTokens: 40",
                "istio-system",
            ),
            true,
        );
        let store = Budgets::local(Arc::new(Metrics::new()));
        match store.admit(&b, &A, &cost(10, None)).await {
            Admission::Reserved {
                reservation,
                completion_limit,
                inject_limit,
            } => {
                assert_eq!(
                    (reservation.reserved(), completion_limit, inject_limit),
                    (50, 40, Some(40))
                );
            }
            _ => panic!("fits"),
        }
        match store.admit(&b, &A, &cost(10, Some(95))).await {
            Admission::Refused { retry_after, message } => {
                assert_eq!(retry_after, None);
                assert!(message.starts_with("Request too large"), "{message}");
            }
            _ => panic!("can never fit"),
        }
    }

    #[test]
    fn selectors_models_and_tenant_scope() {
        let sel = budget(
            "  selector: {namespaces: [team-a]}\n  models: [qwen-*]\n  tokens: 10\n  window: 1m",
            "istio-system",
        );
        let b = budgets(&sel, true);
        assert!(b[0].applies(&A, Some("qwen-turbo")));
        assert!(!b[0].applies(&A, Some("gpt-4o")));
        assert!(!b[0].applies(&A, None));
        assert!(!b[0].applies(&B, Some("qwen-turbo")));
        // A tenant's budget with no selector still binds only its namespace.
        let tenant = budgets(&budget("  tokens: 10\n  window: 1m", "team-b"), false);
        assert!(!tenant[0].applies(&A, None));
        assert!(tenant[0].applies(&B, None));
        let jwt = budgets(
            &budget(
                "  selector: {requestPrincipals: ['issuer/*']}\n  per: RequestPrincipal\n  tokens: 10\n  window: 1m",
                "istio-system",
            ),
            true,
        );
        let with_jwt = Caller {
            request_principal: Some("issuer/alice"),
            ..A
        };
        assert!(!jwt[0].applies(&A, None));
        assert!(jwt[0].applies(&with_jwt, None));
        assert_eq!(jwt[0].key(&with_jwt), "issuer/alice");
    }

    #[test]
    fn cost_reads_the_limits_of_each_operation() {
        let body = br#"{"model":"m","max_tokens":50,"max_completion_tokens":30,"messages":[]}"#;
        let c = Cost::of(body, Operation::Chat).unwrap();
        assert_eq!(
            (c.completion_limit, c.prompt, c.model.as_deref()),
            (Some(50), body.len() as u64, Some("m"))
        );
        // Every choice may use the whole limit.
        assert_eq!(
            Cost::of(br#"{"max_tokens":50,"n":3}"#, Operation::Chat)
                .unwrap()
                .completion_limit,
            Some(150)
        );
        assert_eq!(
            Cost::of(br#"{"max_output_tokens":7}"#, Operation::Responses)
                .unwrap()
                .completion_limit,
            Some(7)
        );
        let e = Cost::of(br#"{"input":"x"}"#, Operation::Embeddings).unwrap();
        assert!(!e.generates && e.completion_limit.is_none());
        // Null is no limit.
        assert_eq!(
            Cost::of(br#"{"max_tokens":null,"n":null}"#, Operation::Chat)
                .unwrap()
                .completion_limit,
            None
        );
    }

    /// A limit or choice count the gateway cannot read as a whole number
    /// is one a lenient provider may still honour (pydantic reads "8" and
    /// 1e5): the request is refused rather than priced without it.
    #[test]
    fn priced_fields_must_be_whole_numbers_given_once() {
        for (body, err) in [
            (
                r#"{"max_completion_tokens":"100000"}"#,
                AdaptError::NotCount("max_completion_tokens"),
            ),
            (r#"{"max_tokens":1e5}"#, AdaptError::NotCount("max_tokens")),
            (r#"{"max_tokens":100.0}"#, AdaptError::NotCount("max_tokens")),
            (r#"{"max_tokens":-1}"#, AdaptError::NotCount("max_tokens")),
            (r#"{"max_tokens":10,"n":"8"}"#, AdaptError::NotCount("n")),
            (r#"{"best_of":[8]}"#, AdaptError::NotCount("best_of")),
            (r#"{"max_tokens":0}"#, AdaptError::NotCount("max_tokens")),
            (r#"{"max_tokens":5,"n":0}"#, AdaptError::NotCount("n")),
            (r#"{"maxTokens":100000}"#, AdaptError::Ambiguous("max_tokens")),
            (
                r#"{"max_tokens":1,"MAX_TOKENS":100000}"#,
                AdaptError::Ambiguous("max_tokens"),
            ),
            (r#"{"n":1,"n":8}"#, AdaptError::Ambiguous("n")),
            (r#"[1]"#, AdaptError::NotObject),
        ] {
            assert_eq!(Cost::of(body.as_bytes(), Operation::Chat), Err(err), "{body}");
        }
        assert!(matches!(
            Cost::of(b"{", Operation::Chat),
            Err(AdaptError::NotJson(_))
        ));
        // A field another operation prices is not this one's to refuse.
        assert!(Cost::of(br#"{"max_output_tokens":"x"}"#, Operation::Chat).is_ok());
    }

    #[test]
    fn windows_are_aligned_to_the_epoch() {
        let b = &budgets(&budget("  tokens: 10\n  window: 1m", "istio-system"), true)[0];
        let (i, end) = b.window_at(UNIX_EPOCH + Duration::from_secs(125));
        assert_eq!((i, end), (2, UNIX_EPOCH + Duration::from_secs(180)));
    }
}
