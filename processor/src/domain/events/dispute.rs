//! A dispute's status as Stripe spells it, and where each stands in a dispute's lifecycle.
//!
//! Invariant: every spelling parses; one this code does not know is kept as
//! [`DisputeStatus::Unknown`] (recorded, never acted upon), so a status Stripe adds later never
//! makes an event unreadable nor reads as any known one.

/// A dispute's `status`, as Stripe spells it. Inquiries (`warning_*`) move no money; a
/// chargeback (`needs_response`, `under_review`) has withdrawn the funds until it closes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DisputeStatus {
    WarningNeedsResponse,
    WarningUnderReview,
    WarningClosed,
    NeedsResponse,
    UnderReview,
    Won,
    Lost,
    /// Resolved by a dispute-prevention network (the charge was refunded instead).
    Prevented,
    /// A status this code does not know: recorded and alerted on, never acted upon.
    Unknown(String),
}

impl DisputeStatus {
    /// Every status Stripe documents, in lifecycle order.
    pub const KNOWN: [&str; 8] = [
        "warning_needs_response",
        "warning_under_review",
        "needs_response",
        "under_review",
        "warning_closed",
        "prevented",
        "won",
        "lost",
    ];

    /// Parses Stripe's spelling; anything else is [`DisputeStatus::Unknown`].
    #[must_use]
    pub fn from_stripe(raw: &str) -> Self {
        match raw {
            "warning_needs_response" => Self::WarningNeedsResponse,
            "warning_under_review" => Self::WarningUnderReview,
            "warning_closed" => Self::WarningClosed,
            "needs_response" => Self::NeedsResponse,
            "under_review" => Self::UnderReview,
            "won" => Self::Won,
            "lost" => Self::Lost,
            "prevented" => Self::Prevented,
            other => Self::Unknown(other.to_owned()),
        }
    }

    /// Stripe's spelling.
    #[must_use]
    pub fn as_str(&self) -> &str {
        match self {
            Self::WarningNeedsResponse => "warning_needs_response",
            Self::WarningUnderReview => "warning_under_review",
            Self::WarningClosed => "warning_closed",
            Self::NeedsResponse => "needs_response",
            Self::UnderReview => "under_review",
            Self::Won => "won",
            Self::Lost => "lost",
            Self::Prevented => "prevented",
            Self::Unknown(raw) => raw,
        }
    }

    /// True once the dispute is over: Stripe never moves a closed dispute again (a later
    /// chargeback on the same charge is a new dispute).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        matches!(
            self,
            Self::WarningClosed | Self::Won | Self::Lost | Self::Prevented
        )
    }

    /// Where the status stands in a dispute's lifecycle (an inquiry escalates to a chargeback,
    /// which closes): orders two statuses reported in the same second.
    #[must_use]
    pub fn stage(&self) -> u8 {
        match self {
            Self::Unknown(_) => 0,
            Self::WarningNeedsResponse => 1,
            Self::WarningUnderReview => 2,
            Self::NeedsResponse => 3,
            Self::UnderReview => 4,
            Self::WarningClosed => 5,
            Self::Prevented => 6,
            Self::Won => 7,
            Self::Lost => 8,
        }
    }
}
