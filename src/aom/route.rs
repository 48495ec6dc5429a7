//! Where a call goes: with `{region}` in `AOM_ENDPOINT`, the host of the
//! request's region. The region is the request's own `region`, else the one
//! `AOM_PROJECT_REGIONS` gives its project, else (IAM mode) the project's
//! name in IAM (`GET /v3/projects/{id}`), else none: the request cannot be
//! routed, a verdict on the request rather than a fault of the credentials.

use super::auth::Auth;
use super::auth::iam::Lookup;
use super::client::CallError;
use crate::domain::{ProjectId, Region, TerminationRequest};
use crate::settings::AomEndpoint;
use reqwest::Url;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long IAM's "no such project" is believed before asking again: a
/// flood of requests for a project that does not exist costs one lookup per
/// minute, not one per request.
const UNKNOWN_HOLD: Duration = Duration::from_secs(60);

/// The endpoint and the regions learnt from IAM.
#[derive(Debug)]
pub struct Router {
    endpoint: AomEndpoint,
    /// By project: a region (kept for good, a project does not move), or
    /// IAM's answer that it has none (kept for [`UNKNOWN_HOLD`]); and the
    /// project's single-flight turn for the lookup.
    learnt: Mutex<HashMap<ProjectId, Arc<Learnt>>>,
}

#[derive(Debug, Default)]
struct Learnt {
    answer: Mutex<Option<Known>>,
    turn: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
enum Known {
    Region(Region),
    Unknown(Instant, String),
}

/// Where one call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The endpoint's base URL for the region (the configured one without
    /// `{region}`).
    pub base: Url,
    /// `None` when the endpoint is not regional.
    pub region: Option<Region>,
}

impl Router {
    pub fn new(endpoint: AomEndpoint) -> Self {
        Self {
            endpoint,
            learnt: Mutex::new(HashMap::new()),
        }
    }

    pub fn endpoint(&self) -> &AomEndpoint {
        &self.endpoint
    }

    pub async fn route(&self, req: &TerminationRequest, auth: &Auth) -> Result<Route, CallError> {
        if !self.endpoint.is_regional() {
            return Ok(Route {
                base: self.endpoint.url().clone(),
                region: None,
            });
        }
        let region = match (
            &req.region,
            self.endpoint.configured_region(&req.project_id),
        ) {
            (Some(region), _) | (None, Some(region)) => region.clone(),
            (None, None) => match auth {
                Auth::Iam(iam) => match self.learnt(&req.project_id) {
                    Some(known) => known?,
                    // Asking IAM is rare, and its future large: boxed, so
                    // that every call's future stays small.
                    None => Box::pin(self.learn(&req.project_id, iam)).await?,
                },
                _ => {
                    return Err(CallError::Unroutable(format!(
                        "no region for project {}: the request has no region field, \
                         AOM_PROJECT_REGIONS has none for it, and only IAM mode can look it up",
                        req.project_id
                    )));
                }
            },
        };
        let base = self.endpoint.url_for(&region).ok_or_else(|| {
            CallError::Unroutable(format!(
                "region {region} does not make a host name in AOM_ENDPOINT"
            ))
        })?;
        Ok(Route {
            base,
            region: Some(region),
        })
    }

    /// What IAM already said of the project's region, if anything.
    fn learnt(&self, project: &ProjectId) -> Option<Result<Region, CallError>> {
        let map = self.learnt.lock().unwrap_or_else(|p| p.into_inner());
        map.get(project).and_then(|learnt| learnt.known())
    }

    /// The project's region from IAM, single-flight per project.
    async fn learn(
        &self,
        project: &ProjectId,
        iam: &Arc<super::auth::IamTokens>,
    ) -> Result<Region, CallError> {
        let learnt = {
            let mut map = self.learnt.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(project.clone()).or_default())
        };
        // The caller found nothing learnt a moment ago; whoever had the turn
        // meanwhile may have learnt it.
        let _turn = learnt.turn.lock().await;
        if let Some(known) = learnt.known() {
            return known;
        }
        let answer = match iam.project_name(project).await {
            Ok(name) => match region_of_project_name(&name) {
                Some(region) => Known::Region(region),
                None => Known::Unknown(
                    Instant::now(),
                    format!("IAM names project {project} {name:?}, which is not a region"),
                ),
            },
            Err(Lookup::Unknown(why)) => Known::Unknown(Instant::now(), why),
            Err(Lookup::Auth(e)) => return Err(CallError::from(e)),
        };
        let result = answer.result();
        *learnt.answer.lock().unwrap_or_else(|p| p.into_inner()) = Some(answer);
        result
    }
}

impl Known {
    fn result(&self) -> Result<Region, CallError> {
        match self {
            Known::Region(region) => Ok(region.clone()),
            Known::Unknown(_, why) => Err(CallError::Unroutable(format!(
                "no region for the project: {why}"
            ))),
        }
    }
}

impl Learnt {
    fn known(&self) -> Option<Result<Region, CallError>> {
        match &*self.answer.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(Known::Unknown(at, _)) if at.elapsed() >= UNKNOWN_HOLD => None,
            Some(known) => Some(known.result()),
            None => None,
        }
    }
}

/// A project's region from its IAM name: the name itself (`cn-north-4`), or
/// for a sub-project (`cn-north-4_payments`) the part before the `_`.
fn region_of_project_name(name: &str) -> Option<Region> {
    let region = name.split_once('_').map_or(name, |(region, _)| region);
    Region::parse(region).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_name_is_its_region() {
        let region = |name: &str| region_of_project_name(name).map(|r| r.as_str().to_owned());
        assert_eq!(region("cn-north-4").as_deref(), Some("cn-north-4"));
        assert_eq!(
            region("ap-southeast-1_payments").as_deref(),
            Some("ap-southeast-1")
        );
        assert_eq!(region("MOS"), None);
        assert_eq!(region(""), None);
    }
}
