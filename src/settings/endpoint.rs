//! Where API calls go: `AOM_ENDPOINT`, whose host may hold `{region}`
//! (`https://aom.{region}.myhuaweicloud.com`), and `AOM_PROJECT_REGIONS`, the
//! region of each project the requests do not name one for.

use super::ConfigError;
use super::auth::http_url;
use crate::domain::{ProjectId, Region};
use std::collections::HashMap;
use std::fmt;

/// The placeholder `AOM_ENDPOINT` may hold in its host.
pub const REGION_PLACEHOLDER: &str = "{region}";

/// The API's base URL and how a request's region is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AomEndpoint {
    /// The base URL. Its host holds [`REGION_PLACEHOLDER`] when the endpoint
    /// is regional (a URL keeps `{` and `}` in a host as they are).
    url: url::Url,
    /// `AOM_PROJECT_REGIONS` (empty without `{region}`).
    regions: HashMap<ProjectId, Region>,
}

impl AomEndpoint {
    /// `AOM_ENDPOINT` and `AOM_PROJECT_REGIONS` (empty: none), checked.
    pub fn parse(endpoint: &str, project_regions: &str) -> Result<Self, ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        let raw = endpoint.trim();
        let url = match url::Url::parse(raw) {
            Ok(u) => match http_url(u.as_str()) {
                Some(u) => u,
                None => return err("AOM_ENDPOINT must be an http:// or https:// URL".to_owned()),
            },
            Err(e) => return err(format!("AOM_ENDPOINT is not a valid URL: {e}")),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return err("AOM_ENDPOINT must not carry credentials".to_owned());
        }
        if url.query().is_some() {
            return err("AOM_ENDPOINT must not have a query string".to_owned());
        }
        let host = url.host_str().unwrap_or_default().to_owned();
        let in_host = host.matches(REGION_PLACEHOLDER).count();
        let anywhere = raw.matches(REGION_PLACEHOLDER).count()
            + raw.matches("%7Bregion%7D").count()
            + raw.matches("%7bregion%7d").count();
        if anywhere > in_host || in_host > 1 {
            return err(format!(
                "AOM_ENDPOINT: {REGION_PLACEHOLDER} may stand once, in the host name only \
                 (like https://aom.{REGION_PLACEHOLDER}.myhuaweicloud.com)"
            ));
        }
        if host.replace(REGION_PLACEHOLDER, "").contains(['{', '}']) {
            return err(format!(
                "AOM_ENDPOINT: the only placeholder is {REGION_PLACEHOLDER}, in the host name"
            ));
        }
        let me = Self {
            url,
            regions: parse_project_regions(project_regions)?,
        };
        if me.is_regional() {
            // A region that would not make a valid host is caught here, not on
            // the first request: the host around the placeholder must take one.
            let probe = Region::parse("cn-north-4").map_err(ConfigError)?;
            if me.url_for(&probe).is_none() {
                return err(format!(
                    "AOM_ENDPOINT: {host} does not make a host name with a region in it"
                ));
            }
        } else if !me.regions.is_empty() {
            return err(format!(
                "AOM_PROJECT_REGIONS is set but AOM_ENDPOINT has no {REGION_PLACEHOLDER} to put \
                 a region in"
            ));
        }
        Ok(me)
    }

    /// True when the host holds `{region}`: each call needs a region.
    pub fn is_regional(&self) -> bool {
        self.url
            .host_str()
            .is_some_and(|h| h.contains(REGION_PLACEHOLDER))
    }

    /// The base URL as configured (with `{region}` when regional).
    pub fn url(&self) -> &url::Url {
        &self.url
    }

    pub fn as_str(&self) -> &str {
        self.url.as_str()
    }

    /// The base URL for `region` (the configured one when not regional);
    /// `None` if the region does not make a valid host.
    pub fn url_for(&self, region: &Region) -> Option<url::Url> {
        let host = self.url.host_str()?;
        if !host.contains(REGION_PLACEHOLDER) {
            return Some(self.url.clone());
        }
        let mut url = self.url.clone();
        url.set_host(Some(&host.replace(REGION_PLACEHOLDER, region.as_str())))
            .ok()?;
        Some(url)
    }

    /// The region `AOM_PROJECT_REGIONS` gives `project`.
    pub fn configured_region(&self, project: &ProjectId) -> Option<&Region> {
        self.regions.get(project)
    }
}

impl fmt::Display for AomEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url.as_str())
    }
}

/// A fixed endpoint, as tests and the demo build one.
impl From<url::Url> for AomEndpoint {
    fn from(url: url::Url) -> Self {
        Self {
            url,
            regions: HashMap::new(),
        }
    }
}

/// `<project_id>=<region>,…`; empty: none.
fn parse_project_regions(s: &str) -> Result<HashMap<ProjectId, Region>, ConfigError> {
    let fail = |why: String| ConfigError(format!("AOM_PROJECT_REGIONS: {why}"));
    let mut map = HashMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((project, region)) = item.split_once('=') else {
            return Err(fail(format!(
                "`{item}` is not <project_id>=<region> (like 0123…cdef=cn-north-4)"
            )));
        };
        let project = ProjectId::parse(project.trim()).map_err(fail)?;
        let region = Region::parse(region.trim()).map_err(fail)?;
        if map.insert(project.clone(), region).is_some() {
            return Err(fail(format!("project {project} is listed twice")));
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P1: &str = "0123456789abcdef0123456789abcdef";
    const P2: &str = "fedcba9876543210fedcba9876543210";

    fn region(s: &str) -> Region {
        Region::parse(s).expect("region")
    }

    #[test]
    fn a_fixed_endpoint_is_used_as_it_is() {
        let e = AomEndpoint::parse("https://aom.example.com/prefix/", "").expect("valid");
        assert!(!e.is_regional());
        assert_eq!(
            e.url_for(&region("eu-west-0")).map(String::from).as_deref(),
            Some("https://aom.example.com/prefix/")
        );
    }

    #[test]
    fn a_region_template_fills_the_host() {
        let e = AomEndpoint::parse(
            "https://aom.{region}.myhuaweicloud.com:8443/api",
            &format!("{P1}=cn-north-4, {P2}=ap-southeast-1"),
        )
        .expect("valid");
        assert!(e.is_regional());
        assert_eq!(
            e.url_for(&region("cn-north-4"))
                .map(String::from)
                .as_deref(),
            Some("https://aom.cn-north-4.myhuaweicloud.com:8443/api")
        );
        let p2 = ProjectId::parse(P2).expect("id");
        assert_eq!(e.configured_region(&p2), Some(&region("ap-southeast-1")));
        let other = ProjectId::parse(&"a".repeat(32)).expect("id");
        assert_eq!(e.configured_region(&other), None);
        assert_eq!(
            e.to_string(),
            "https://aom.{region}.myhuaweicloud.com:8443/api"
        );
    }

    #[test]
    fn misplaced_templates_and_bad_regions_are_refused_with_the_setting_named() {
        let error = |endpoint: &str, regions: &str| {
            AomEndpoint::parse(endpoint, regions)
                .expect_err("must be refused")
                .0
        };
        for endpoint in [
            "https://aom.example.com/{region}/",
            "https://aom.{region}.example.com/{region}",
            "https://{region}.{region}.example.com",
            "https://aom.{zone}.example.com",
            "https://aom.example.com/?r={region}",
        ] {
            let msg = error(endpoint, "");
            assert!(msg.starts_with("AOM_ENDPOINT"), "{endpoint}: {msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
        for regions in [
            "nonsense",
            &format!("{P1}=CN_NORTH"),
            "short=cn-north-4",
            &format!("{P1}=cn-north-4,{P1}=cn-north-1"),
        ] {
            let msg = error("https://aom.{region}.example.com", regions);
            assert!(msg.starts_with("AOM_PROJECT_REGIONS"), "{regions}: {msg}");
        }
        let msg = error("https://aom.example.com", &format!("{P1}=cn-north-4"));
        assert!(msg.contains("{region}"), "{msg}");
    }
}
