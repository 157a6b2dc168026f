//! Which Stripe events are this service's: one mode (live or test) and one account, or the
//! Connect accounts it serves. An event of another mode or account changes nothing.
//!
//! The mode comes from `STRIPE_SECRET_KEY`'s prefix (`sk_live_`/`rk_live_` or
//! `sk_test_`/`rk_test_`), or from `STRIPE_MODE` when there is no key; without either, events of
//! both modes are taken (as before this rule). The accounts are `STRIPE_ACCOUNTS`: an event that
//! names a Connect `account` is taken only when it is listed; an event naming none is the
//! platform's own.

use super::events::Origin;

/// A Stripe mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeMode {
    Live,
    Test,
}

impl StripeMode {
    /// The mode of a secret or restricted key, from its prefix.
    #[must_use]
    pub fn of_key(key: &str) -> Option<Self> {
        if key.starts_with("sk_live_") || key.starts_with("rk_live_") {
            Some(Self::Live)
        } else if key.starts_with("sk_test_") || key.starts_with("rk_test_") {
            Some(Self::Test)
        } else {
            None
        }
    }

    /// `live` or `test`, as `STRIPE_MODE` spells it.
    #[must_use]
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "live" => Some(Self::Live),
            "test" => Some(Self::Test),
            _ => None,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
        }
    }
}

/// Why an event is not this service's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its `livemode` is the other mode.
    Mode,
    /// It names a Connect account that is not served.
    Account,
}

impl Refusal {
    /// The `reason` label of `events_out_of_scope_total`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mode => "mode",
            Self::Account => "account",
        }
    }
}

/// The events this service takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// `None`: both modes (no key and no `STRIPE_MODE`).
    pub mode: Option<StripeMode>,
    /// The Connect accounts served besides the platform's own events.
    pub accounts: Vec<String>,
}

impl Scope {
    /// Why an event from `origin` is refused, if it is. An event that does not say its mode
    /// (an older payload) is taken.
    #[must_use]
    pub fn refusal(&self, origin: &Origin) -> Option<Refusal> {
        let mode = origin.livemode.map(|live| {
            if live {
                StripeMode::Live
            } else {
                StripeMode::Test
            }
        });
        if let (Some(served), Some(sent)) = (self.mode, mode)
            && served != sent
        {
            return Some(Refusal::Mode);
        }
        match &origin.account {
            Some(account) if !self.accounts.iter().any(|a| a == account) => Some(Refusal::Account),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(livemode: Option<bool>, account: Option<&str>) -> Origin {
        Origin {
            livemode,
            account: account.map(str::to_owned),
        }
    }

    #[test]
    fn the_key_says_the_mode() {
        assert_eq!(StripeMode::of_key("sk_live_abc"), Some(StripeMode::Live));
        assert_eq!(StripeMode::of_key("rk_live_abc"), Some(StripeMode::Live));
        assert_eq!(StripeMode::of_key("sk_test_abc"), Some(StripeMode::Test));
        assert_eq!(StripeMode::of_key("rk_test_abc"), Some(StripeMode::Test));
        assert_eq!(StripeMode::of_key("sk_abc"), None);
    }

    #[test]
    fn an_event_of_the_other_mode_or_an_unserved_account_is_refused() {
        let test = Scope {
            mode: Some(StripeMode::Test),
            accounts: vec!["acct_served".into()],
        };
        assert_eq!(test.refusal(&origin(Some(false), None)), None);
        assert_eq!(test.refusal(&origin(None, None)), None, "mode unsaid");
        assert_eq!(test.refusal(&origin(Some(true), None)), Some(Refusal::Mode));
        assert_eq!(
            test.refusal(&origin(Some(false), Some("acct_served"))),
            None
        );
        assert_eq!(
            test.refusal(&origin(Some(false), Some("acct_other"))),
            Some(Refusal::Account)
        );
        let live = Scope {
            mode: Some(StripeMode::Live),
            accounts: Vec::new(),
        };
        assert_eq!(
            live.refusal(&origin(Some(false), None)),
            Some(Refusal::Mode)
        );
        assert_eq!(
            live.refusal(&origin(Some(true), Some("acct_any"))),
            Some(Refusal::Account)
        );
        let any = Scope::default();
        assert_eq!(any.refusal(&origin(Some(true), None)), None);
        assert_eq!(any.refusal(&origin(Some(false), None)), None);
    }
}
