// Microsoft commercial marketplace SaaS fulfillment: the whole Azure footprint, deployed with
// `azd up` (or `azd provision`). Declarative and repeatable: running it again converges the
// resources to this description, and nothing in it is a stored key.
//
//   resource group
//   ├─ user-assigned managed identity    every data-plane access of the app (no keys anywhere)
//   ├─ storage account                   host storage, deployment package, tables, events queue
//   ├─ Key Vault (RBAC)                  marketplace credential, LANDING_FORM_SECRET, other secrets
//   ├─ Log Analytics + App Insights      telemetry, Entra ID ingestion only
//   ├─ Flex Consumption plan + app       Python 3.11 on Linux, Easy Auth for the landing page
//   └─ alert rules                       function failures, webhook 401s, reconciliation flags
//
// Read docs/deploy.md first: two Entra app registrations are created by hand (or with the az CLI
// commands there), and their ids are passed in as parameters.
targetScope = 'subscription'

// ---- azd conventions ------------------------------------------------------------------------

@minLength(1)
@maxLength(64)
@description('azd environment name; part of every resource name and of the resource group name.')
param environmentName string

@minLength(1)
@description('Region of all resources. It must offer Flex Consumption (`az functionapp list-flexconsumption-locations`).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Object id of whoever runs azd (azd passes AZURE_PRINCIPAL_ID): gets Key Vault Secrets/Certificates Officer to set the credentials. Empty: no assignment.')
param principalId string = ''

@description('Kind of principalId (azd passes AZURE_PRINCIPAL_TYPE: User locally, ServicePrincipal in the pipeline).')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param principalType string = 'User'

@description('Resource group name. Empty: rg-<environmentName>.')
param resourceGroupName string = ''

// ---- Marketplace API credential (Partner Center technical configuration) -----------------------

@description('Entra tenant id of the marketplace app registration. Empty: the tenant of this subscription.')
param marketplaceTenantId string = ''

@description('Application (client) id of the single-tenant marketplace app registration (docs/deploy.md, step 1). Partner Center\'s "Microsoft Entra application ID".')
param marketplaceClientId string = ''

@description('certificate (preferred): a certificate in Key Vault; secret: a client secret in Key Vault; federated: no secret, the marketplace app trusts the managed identity (workload identity federation).')
@allowed([
  'certificate'
  'secret'
  'federated'
])
param marketplaceCredentialType string = 'certificate'

// ---- Landing page sign-in (App Service Authentication) --------------------------------------------

@description('Application (client) id of the multi-tenant landing page sign-in app registration (docs/deploy.md, step 2). Empty: the landing page answers 401 until it is set.')
param signInClientId string = ''

@description('secret: the sign-in app\'s client secret in Key Vault; federated: the sign-in app trusts the managed identity (App Service Authentication preview feature, no secret).')
@allowed([
  'secret'
  'federated'
])
param signInCredentialType string = 'secret'

@description('Who may sign in on the landing page. workSchoolAndPersonal (default, as Microsoft\'s SaaS life-cycle guidance asks of landing pages): work or school accounts of any tenant and personal Microsoft accounts (issuer common). workSchoolOnly: work or school accounts of any tenant (issuer organizations). The sign-in app registration\'s audience must match: output SIGN_IN_AUDIENCE.')
@allowed([
  'workSchoolAndPersonal'
  'workSchoolOnly'
])
param signInAccounts string = 'workSchoolAndPersonal'

// ---- App behaviour ------------------------------------------------------------------------------

@description('RECONCILE_SCHEDULE: NCRONTAB with 6 fields (seconds first), UTC. Flex Consumption ignores WEBSITE_TIME_ZONE.')
param reconcileSchedule string = '0 */30 * * * *'

@description('METERING_SCHEDULE: NCRONTAB with 6 fields (seconds first), UTC; by default 5 minutes past every hour.')
param meteringSchedule string = '0 5 * * * *'

@description('ACTIVATION_MODE: auto activates the subscription when the buyer confirms; manual records PendingActivation for an operator.')
@allowed([
  'auto'
  'manual'
])
param activationMode string = 'auto'

@description('TABLES_PREFIX: letters and digits prefixed to the table names the app creates.')
param tablesPrefix string = 'saas'

@description('EVENTS_QUEUE_NAME: the storage queue for lifecycle events (created here).')
@minLength(3)
@maxLength(63)
param eventsQueueName string = 'subscription-events'

@description('EVENTS_WEBHOOK_URL: optional HTTPS URL that also receives lifecycle events. When set, store its HMAC secret in Key Vault as events-webhook-secret.')
param eventsWebhookUrl string = ''

@description('SAAS_APP_URL: the SaaS application, linked from the landing page.')
param saasAppUrl string = ''

@description('BRAND_NAME: product name on the landing page.')
param brandName string = 'Contoso SaaS'

@description('BRAND_LOGO_URL: optional logo on the landing page.')
param brandLogoUrl string = ''

@description('SUPPORT_EMAIL: support contact on the landing page.')
param supportEmail string = ''

@description('PUBLISHER_POLICY: optional module:function deciding ChangePlan/ChangeQuantity/Reinstate.')
param publisherPolicy string = ''

@description('PUBLISHER_API_AUDIENCE: Application ID URI of the API registration the SaaS application calls (docs/deploy.md).')
param publisherApiAudience string = ''

// ---- Operations -----------------------------------------------------------------------------------

@description('E-mail address the alerts notify. Empty: alerts only appear in the Azure portal.')
param alertEmail string = ''

@description('The webhook-401 alert fires above this many rejected webhook calls in 15 minutes.')
@minValue(0)
param webhook401Threshold int = 3

@description('Upper bound of Flex Consumption instances.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Zone-redundant Flex Consumption plan (only in regions that support it).')
param zoneRedundant bool = false

// ---- Generated secret -----------------------------------------------------------------------------

@description('LANDING_FORM_SECRET as azd passes it: the value already in Key Vault on later provisions, a new random one on the first (see main.parameters.json).')
@secure()
param landingFormSecret string = ''

@description('Extra randomness for LANDING_FORM_SECRET on the first provision. Leave the default.')
@secure()
// checkov:skip=CKV_AZURE_131: The default is newGuid(), a fresh random value on every deployment, not a hard-coded secret (the ARM template test toolkit allows newGuid() here for the same reason).
param landingFormSecretEntropy string = newGuid()

// ---- Names ----------------------------------------------------------------------------------------

var abbrs = loadJsonContent('./abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var functionAppName = '${abbrs.webSitesFunctions}api-${resourceToken}'
var deploymentContainerName = 'app-package'
var signInAuthority = signInAccounts == 'workSchoolAndPersonal' ? 'common' : 'organizations'
var effectiveMarketplaceTenantId = empty(marketplaceTenantId) ? tenant().tenantId : marketplaceTenantId

// Key Vault secret names the app settings reference (docs/deploy.md tells operators to use them).
var secretNames = {
  landingFormSecret: 'landing-form-secret'
  marketplaceCertificate: 'marketplace-api-certificate'
  marketplaceClientSecret: 'marketplace-client-secret'
  signInClientSecret: 'landing-signin-client-secret'
  eventsWebhookSecret: 'events-webhook-secret'
}

// azd generates 15 letters and digits on the first provision; the app wants 32 or more, so the
// first value is lengthened once with a random GUID. Later provisions read the stored value back
// (it is already long), so the secret stays stable until an operator rotates it.
var effectiveLandingFormSecret = length(landingFormSecret) >= 32 ? landingFormSecret : '${landingFormSecret}${replace(landingFormSecretEntropy, '-', '')}'

resource rg 'Microsoft.Resources/resourceGroups@2021-04-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : '${abbrs.resourcesResourceGroups}${environmentName}'
  location: location
  tags: tags
}

module identity './core/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}api-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage './core/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: deploymentContainerName
    eventsQueueName: eventsQueueName
    appPrincipalId: identity.outputs.principalId
  }
}

module keyVault './core/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: '${abbrs.keyVaultVaults}${resourceToken}'
    location: location
    tags: tags
    appPrincipalId: identity.outputs.principalId
    deployerPrincipalId: principalId
    deployerPrincipalType: principalType
    landingFormSecret: effectiveLandingFormSecret
  }
}

module monitoring './core/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    applicationInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: tags
    appPrincipalId: identity.outputs.principalId
  }
}

module api './app/api.bicep' = {
  name: 'api'
  scope: rg
  params: {
    name: functionAppName
    planName: '${abbrs.webServerFarms}${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    maximumInstanceCount: maximumInstanceCount
    zoneRedundant: zoneRedundant
    blobEndpoint: storage.outputs.blobEndpoint
    queueEndpoint: storage.outputs.queueEndpoint
    tableEndpoint: storage.outputs.tableEndpoint
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    applicationInsightsConnectionString: monitoring.outputs.connectionString
    keyVaultUri: keyVault.outputs.uri
    secretNames: secretNames
    marketplaceTenantId: effectiveMarketplaceTenantId
    marketplaceClientId: marketplaceClientId
    marketplaceCredentialType: marketplaceCredentialType
    signInClientId: signInClientId
    signInCredentialType: signInCredentialType
    signInIssuer: '${environment().authentication.loginEndpoint}${signInAuthority}/v2.0'
    reconcileSchedule: reconcileSchedule
    meteringSchedule: meteringSchedule
    activationMode: activationMode
    tablesPrefix: tablesPrefix
    eventsQueueName: eventsQueueName
    eventsWebhookUrl: eventsWebhookUrl
    saasAppUrl: saasAppUrl
    brandName: brandName
    brandLogoUrl: brandLogoUrl
    supportEmail: supportEmail
    publisherPolicy: publisherPolicy
    publisherApiAudience: publisherApiAudience
  }
}

module alerts './app/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    location: location
    tags: tags
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    namePrefix: '${abbrs.insightsScheduledQueryRules}${resourceToken}-'
    actionGroupName: '${abbrs.insightsActionGroups}${resourceToken}'
    alertEmail: alertEmail
    webhook401Threshold: webhook401Threshold
  }
}

// ---- Outputs (azd stores them in .azure/<env>/.env) ---------------------------------------------

// Partner Center > Offer > Technical configuration, field by field.
output PARTNER_CENTER_LANDING_PAGE_URL string = 'https://${api.outputs.defaultHostName}/api/landing'
output PARTNER_CENTER_CONNECTION_WEBHOOK string = 'https://${api.outputs.defaultHostName}/api/webhook'
output PARTNER_CENTER_ENTRA_TENANT_ID string = effectiveMarketplaceTenantId
output PARTNER_CENTER_ENTRA_APPLICATION_ID string = marketplaceClientId

// For the app registrations (docs/deploy.md).
// The sign-in app registration's audience (az ad app create --sign-in-audience) for signInAccounts.
output SIGN_IN_AUDIENCE string = signInAccounts == 'workSchoolAndPersonal' ? 'AzureADandPersonalMicrosoftAccount' : 'AzureADMultipleOrgs'
output SIGN_IN_REDIRECT_URI string = 'https://${api.outputs.defaultHostName}/.auth/login/aad/callback'
output MANAGED_IDENTITY_CLIENT_ID string = identity.outputs.clientId
// Subject of a federated identity credential that trusts the managed identity.
output MANAGED_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output FEDERATED_CREDENTIAL_ISSUER string = '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'

// For azd and operators.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_FUNCTION_APP_NAME string = api.outputs.name
output SERVICE_API_NAME string = api.outputs.name
output SERVICE_API_URI string = api.outputs.uri
