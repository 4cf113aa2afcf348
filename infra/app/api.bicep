// The Function App: Flex Consumption plan, Linux, Python, one user-assigned managed identity,
// identity-based host storage, Key Vault references for every secret, and App Service
// Authentication (Easy Auth) with Microsoft Entra ID in front of the landing page.
//
// The `appSettings` variable below is the single list of app settings (the site's
// siteConfig.appSettings is built from it). tests/infra/test_infra.py reads it and fails when a
// name of shared/settings.py (scope "app") is missing here, or a name here is unknown to the code
// (apart from the commented platform allow-list in the test).

@description('Function App name (globally unique host name prefix).')
param name string

@description('Flex Consumption plan name.')
param planName string

@description('Azure region (must offer Flex Consumption: `az functionapp list-flexconsumption-locations`).')
param location string

@description('Tags applied to the plan and the app.')
param tags object = {}

@description('azd service name from azure.yaml; the app is tagged with it so `azd deploy` finds it.')
param serviceName string = 'api'

@description('Resource id of the user-assigned managed identity.')
param identityId string

@description('Client id of the user-assigned managed identity.')
param identityClientId string

@description('Python version of the Flex Consumption runtime.')
@allowed([
  '3.10'
  '3.11'
  '3.12'
])
param pythonVersion string = '3.11'

@description('Instance memory size (MB) of the Flex Consumption plan.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Upper bound of scale-out instances.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Spread the plan\'s instances across availability zones (only in regions where Flex Consumption supports it).')
param zoneRedundant bool = false

@description('Blob endpoint of the storage account, without trailing slash.')
param blobEndpoint string

@description('Queue endpoint of the storage account, without trailing slash.')
param queueEndpoint string

@description('Table endpoint of the storage account, without trailing slash.')
param tableEndpoint string

@description('URL of the blob container that receives the deployment package.')
param deploymentContainerUrl string

@description('Application Insights connection string (not a credential: local auth is disabled on the component).')
param applicationInsightsConnectionString string

@description('Key Vault URI, with the trailing slash (https://<vault>.vault.azure.net/).')
param keyVaultUri string

@description('Names of the Key Vault secrets the app settings reference.')
param secretNames object

// ---- Marketplace (SaaS Fulfillment API v2) -------------------------------------------------

@description('Entra tenant id of the marketplace app registration (MARKETPLACE_TENANT_ID).')
param marketplaceTenantId string

@description('Application (client) id of the marketplace app registration (MARKETPLACE_CLIENT_ID).')
param marketplaceClientId string

@description('How the app proves it is the marketplace app registration: a certificate in Key Vault (preferred), a client secret in Key Vault, or workload identity federation with the managed identity (no secret at all).')
@allowed([
  'certificate'
  'secret'
  'federated'
])
param marketplaceCredentialType string = 'certificate'

// ---- Landing page sign-in (App Service Authentication) -------------------------------------

@description('Application (client) id of the multi-tenant landing page sign-in app registration. Empty: App Service Authentication has no provider yet and answers 401 on every path except the webhook and the health check.')
param signInClientId string = ''

@description('How App Service Authentication redeems sign-in codes: a client secret in Key Vault, or a federated credential on the sign-in app that trusts the managed identity (preview feature of App Service Authentication).')
@allowed([
  'secret'
  'federated'
])
param signInCredentialType string = 'secret'

@description('OpenID issuer of the sign-in app (main.bicep derives it from signInAccounts). The `common` v2.0 endpoint accepts work, school and personal Microsoft accounts from any tenant; `organizations` only work and school accounts.')
param signInIssuer string = 'https://login.microsoftonline.com/common/v2.0'

// ---- App behaviour -------------------------------------------------------------------------

@description('NCRONTAB schedule (6 fields, UTC) of the reconciliation timer (RECONCILE_SCHEDULE).')
param reconcileSchedule string

@description('ACTIVATION_MODE: `auto` activates when the buyer confirms; `manual` waits for an operator.')
@allowed([
  'auto'
  'manual'
])
param activationMode string

@description('TABLES_PREFIX: prefix of the table names the app creates.')
param tablesPrefix string

@description('NCRONTAB schedule (6 fields, UTC) of the metering timer (METERING_SCHEDULE).')
param meteringSchedule string = '0 5 * * * *'

@description('EVENTS_QUEUE_NAME: the storage queue created for lifecycle events.')
param eventsQueueName string

@description('EVENTS_WEBHOOK_URL: optional HTTPS endpoint that receives lifecycle events. When set, the HMAC secret comes from Key Vault.')
param eventsWebhookUrl string = ''

@description('SAAS_APP_URL: URL of the SaaS application, linked from the landing page.')
param saasAppUrl string = ''

@description('BRAND_NAME shown on the landing page.')
param brandName string = 'Contoso SaaS'

@description('BRAND_LOGO_URL shown on the landing page (optional).')
param brandLogoUrl string = ''

@description('SUPPORT_EMAIL shown on the landing page.')
param supportEmail string = ''

@description('PUBLISHER_POLICY: optional `module:function` that decides ChangePlan/ChangeQuantity/Reinstate.')
param publisherPolicy string = ''

@description('PUBLISHER_API_AUDIENCE: Application ID URI (or client id) of the API registration the SaaS application gets tokens for; empty: the publisher API answers 503 until it is set.')
param publisherApiAudience string = ''

var signInEnabled = !empty(signInClientId)

// A Key Vault reference to the current version of a secret, resolved by the platform with the
// identity named in keyVaultReferenceIdentity; the value never appears in the app's configuration.
var kvReferencePrefix = '@Microsoft.KeyVault(SecretUri=${keyVaultUri}secrets/'

var appSettings = {
  // ---- Functions host storage, identity-based (no connection string exists) ----
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  AzureWebJobsStorage__blobServiceUri: blobEndpoint
  AzureWebJobsStorage__queueServiceUri: queueEndpoint
  AzureWebJobsStorage__tableServiceUri: tableEndpoint

  // ---- Application Insights, Entra ID authentication with the managed identity ----
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD;ClientId=${identityClientId}'

  // ---- App Service Authentication: the setting named by clientSecretSettingName ----
  // 'secret': a Key Vault reference to the sign-in app's client secret.
  MICROSOFT_PROVIDER_AUTHENTICATION_SECRET: signInCredentialType == 'secret' && signInEnabled ? '${kvReferencePrefix}${secretNames.signInClientSecret})' : ''
  // 'federated': the managed identity's client id; the platform then sends a managed identity
  // token as client assertion (the sign-in app must trust the identity, see docs/deploy.md).
  OVERRIDE_USE_MI_FIC_ASSERTION_CLIENTID: signInCredentialType == 'federated' && signInEnabled ? identityClientId : ''

  // ---- The app's own settings (shared/settings.py, scope "app") ----
  MARKETPLACE_API_BASE_URL: 'https://marketplaceapi.microsoft.com/api'
  MARKETPLACE_API_VERSION: '2018-08-31'
  MARKETPLACE_AUTH: 'entra'
  // Only Microsoft's SaaS API emulator needs a publisher id; the real API takes none.
  MARKETPLACE_PUBLISHER_ID: ''
  MARKETPLACE_TENANT_ID: marketplaceTenantId
  MARKETPLACE_CLIENT_ID: marketplaceClientId
  // Exactly one credential is set, chosen by marketplaceCredentialType.
  MARKETPLACE_CLIENT_SECRET: marketplaceCredentialType == 'secret' ? '${kvReferencePrefix}${secretNames.marketplaceClientSecret})' : ''
  // A Key Vault certificate is read through its secret: base64 PKCS#12 with the private key, no password.
  MARKETPLACE_CLIENT_CERTIFICATE: marketplaceCredentialType == 'certificate' ? '${kvReferencePrefix}${secretNames.marketplaceCertificate})' : ''
  MARKETPLACE_CLIENT_CERTIFICATE_PASSWORD: ''
  MARKETPLACE_USE_FEDERATED_IDENTITY: marketplaceCredentialType == 'federated' ? 'true' : 'false'
  // The user-assigned identity for storage, Key Vault and federation (never the marketplace app id).
  AZURE_CLIENT_ID: identityClientId
  TABLES_ENDPOINT: tableEndpoint
  TABLES_PREFIX: tablesPrefix
  RECONCILE_SCHEDULE: reconcileSchedule
  RECONCILE_TIME_BUDGET_SECONDS: '480'
  RECONCILE_ACTIVATION_RETRY_LIMIT: '3'
  RECONCILE_OPERATION_DEADLINE_SECONDS: '600'
  ACTIVATION_MODE: activationMode
  SAAS_APP_URL: saasAppUrl
  LANDING_REQUIRE_SIGNIN: 'true'
  LANDING_FORM_SECRET: '${kvReferencePrefix}${secretNames.landingFormSecret})'
  BRAND_NAME: brandName
  BRAND_LOGO_URL: brandLogoUrl
  SUPPORT_EMAIL: supportEmail
  WEBHOOK_AUTH: 'entra'
  // Empty: the code defaults the audience to MARKETPLACE_CLIENT_ID and the OpenID metadata to
  // the Entra endpoint of MARKETPLACE_TENANT_ID, which is what Microsoft's webhook tokens carry.
  WEBHOOK_AUDIENCE: ''
  WEBHOOK_OPENID_CONFIG_URL: ''
  WEBHOOK_VERIFY_OPERATION: 'true'
  WEBHOOK_MAX_BODY_BYTES: '65536'
  WEBHOOK_DEADLINE_SECONDS: '8'
  LANDING_DEADLINE_SECONDS: '20'
  LANDING_TENANT_CHECK: 'details'
  PUBLISHER_POLICY: publisherPolicy
  // The SaaS application's API: Entra tokens for this app's API registration with an app role
  // (docs/deploy.md, "Publisher API"). Tenant and metadata default to MARKETPLACE_TENANT_ID's.
  PUBLISHER_API_AUTH: 'entra'
  PUBLISHER_API_AUDIENCE: publisherApiAudience
  PUBLISHER_API_TENANT_ID: ''
  PUBLISHER_API_OPENID_CONFIG_URL: ''
  PUBLISHER_API_DEADLINE_SECONDS: '10'
  PUBLISHER_OPERATION_POLL_SECONDS: '5'
  PUBLISHER_CLAIM_TIMEOUT_SECONDS: '300'
  USAGE_API_DEADLINE_SECONDS: '60'
  METERING_SCHEDULE: meteringSchedule
  METERING_TIME_BUDGET_SECONDS: '240'
  METERING_EXPIRY_WARNING_HOURS: '4'
  METERING_LATE_USAGE: 'carry'
  METERING_EMISSION: 'on'
  USAGE_RECONCILE_SCHEDULE: '0 30 2 * * *'
  USAGE_RECONCILE_DAYS: '2'
  CONSOLE_AUTH: 'entra'
  // Empty: the marketplace app's tenant (the publisher's own) is the console's.
  CONSOLE_TENANT_ID: ''
  EVENTS_QUEUE_NAME: eventsQueueName
  EVENTS_WORK_QUEUE: '${eventsQueueName}-jobs'
  OPERATIONS_WORK_QUEUE: '${eventsQueueName}-operations'
  EVENTS_QUEUE_ENDPOINT: queueEndpoint
  EVENTS_WEBHOOK_URL: eventsWebhookUrl
  EVENTS_WEBHOOK_SECRET: empty(eventsWebhookUrl) ? '' : '${kvReferencePrefix}${secretNames.eventsWebhookSecret})'
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    // checkov:skip=CKV_AZURE_225: Zone redundancy on Flex Consumption depends on the region; it is the zoneRedundant parameter (off by default so the template deploys in every Flex region).
    // Linux
    reserved: true
    zoneRedundant: zoneRedundant
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': serviceName
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    // Key Vault references resolve with the user-assigned identity (the default would be a
    // system-assigned identity, which this app does not have).
    keyVaultReferenceIdentity: identityId
    // checkov:skip=CKV_AZURE_222: The app must be public: Microsoft calls the webhook and buyers open the landing page from the internet (the webhook checks Microsoft's token, the landing page requires Entra sign-in).
    // checkov:skip=CKV_AZURE_17: Neither caller can present a client certificate (Microsoft's webhook sender and buyers' browsers); callers are authenticated with Entra ID tokens instead.
    publicNetworkAccess: 'Enabled'
    // checkov:skip=CKV_AZURE_78: Flex Consumption has no FTP(S) endpoint; `ftpsState` is on its list of deprecated site properties, so it cannot be set.
    // checkov:skip=CKV_AZURE_212: numberOfWorkers belongs to dedicated plans; Flex Consumption scales per function on demand (maximumInstanceCount) and replaces failed instances itself.
    // checkov:skip=CKV_AZURE_213: The platform health check (healthCheckPath) needs a Premium or Dedicated plan; failures surface through the Application Insights alerts instead.
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
      // The complete set of app settings; `appSettings` above is the single list.
      appSettings: [for setting in items(appSettings): {
        name: setting.key
        value: setting.value
      }]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

// App Service Authentication (Easy Auth v2) with Microsoft Entra ID, for the landing page.
// Everything requires a signed-in user except the paths that Microsoft, probes and the SaaS
// application call: the webhook and the publisher API (they validate bearer tokens themselves)
// and the health check.
// Easy Auth stays on even before the sign-in app exists (signInClientId empty): it is what strips
// X-MS-CLIENT-PRINCIPAL* headers sent by clients, so with it off anyone could claim to be signed in.
// Without a provider every protected path answers 401 until the sign-in app is configured.
resource siteAuth 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: site
  name: 'authsettingsV2'
  properties: {
    // checkov:skip=CKV_AZURE_13: False positive: the check reads `properties.enabled` of the legacy authsettings resource; this is authsettingsV2, enabled by `platform.enabled`.
    // checkov:skip=CKV_AZURE_222: False positive: public network access is a site property (see the site for why it is public).
    platform: {
      enabled: true
      runtimeVersion: '~1'
    }
    globalValidation: {
      requireAuthentication: true
      unauthenticatedClientAction: signInEnabled ? 'RedirectToLoginPage' : 'Return401'
      redirectToProvider: 'azureactivedirectory'
      excludedPaths: [
        '/api/webhook'
        '/api/health'
        // The publisher API: the SaaS application's bearer token is validated in code (audience,
        // tenant, app role). A trailing `/*` excludes everything below the path (docs/marketplace-notes.md).
        '/api/subscriptions/*'
        '/api/operations/*'
        // Metered usage from the SaaS application (same in-code validation, app role Usage.Write).
        '/api/usage'
      ]
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: signInEnabled
        registration: {
          clientId: signInClientId
          clientSecretSettingName: signInCredentialType == 'federated' ? 'OVERRIDE_USE_MI_FIC_ASSERTION_CLIENTID' : 'MICROSOFT_PROVIDER_AUTHENTICATION_SECRET'
          // Multi-tenant: buyers sign in from their own tenants (or with personal accounts).
          openIdIssuer: signInIssuer
        }
        login: {
          // User.Read is the only Graph permission the sign-in app asks for.
          loginParameters: [
            'scope=openid profile email offline_access https://graph.microsoft.com/User.Read'
          ]
        }
        validation: {
          // Tokens issued to the sign-in app itself (its ID tokens).
          allowedAudiences: signInEnabled ? [
            signInClientId
          ] : []
        }
      }
    }
    login: {
      tokenStore: {
        enabled: true
      }
    }
    // The checks below target properties of the `web` site config, but checkov applies them to
    // every Microsoft.Web/sites/config resource, including this authsettingsV2 one:
    // checkov:skip=CKV_AZURE_63: False positive: HTTP logging is a `web` config property, not one of authsettingsV2; Flex Consumption logs to Application Insights.
    // checkov:skip=CKV_AZURE_65: False positive: detailed error pages are a `web` config property, not one of authsettingsV2.
    httpSettings: {
      requireHttps: true
    }
    // checkov:skip=CKV_AZURE_66: False positive: failed request tracing is a `web` config property, not one of authsettingsV2.
    // checkov:skip=CKV_AZURE_80: Not applicable: netFrameworkVersion is a .NET `web` config property; this is a Python app and an authsettingsV2 resource.
    // checkov:skip=CKV_AZURE_88: Not applicable: Azure Files mounts are `azurestorageaccounts` config; Flex Consumption runs from the blob deployment package.
  }
}

output name string = site.name
output defaultHostName string = site.properties.defaultHostName
output uri string = 'https://${site.properties.defaultHostName}'
