// Key Vault (Azure RBAC mode) for the app's secrets:
//   - landing-form-secret           LANDING_FORM_SECRET (generated on the first `azd provision`, kept afterwards)
//   - marketplace-api-certificate   marketplace app credential, marketplaceCredentialType = 'certificate' (created by an operator, see docs/deploy.md)
//   - marketplace-client-secret     marketplace app credential, marketplaceCredentialType = 'secret' (set by an operator)
//   - landing-signin-client-secret  landing page sign-in app secret, signInCredentialType = 'secret' (set by an operator)
//   - events-webhook-secret         EVENTS_WEBHOOK_SECRET, only when eventsWebhookUrl is set (set by an operator)
// The app reads them through Key Vault references resolved with its user-assigned identity; nothing
// secret is stored in app settings, the repository or the azd environment.

@description('Key Vault name: 3-24 letters, digits and hyphens, globally unique.')
@minLength(3)
@maxLength(24)
param name string

@description('Azure region.')
param location string

@description('Tags applied to the vault.')
param tags object = {}

@description('Principal (object) id of the Function App managed identity (reads secrets for Key Vault references).')
param appPrincipalId string

@description('Object id of the person or pipeline running azd. Gets "Key Vault Secrets Officer" so it can set the credentials after provisioning and so azd can read landing-form-secret back on the next provision. Empty: no assignment.')
param deployerPrincipalId string = ''

@description('Principal type of deployerPrincipalId.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param deployerPrincipalType string = 'User'

@description('Value of LANDING_FORM_SECRET, as main.parameters.json passes it: the stored value on later provisions, a fresh random one on the first.')
@secure()
param landingFormSecret string

var roles = {
  // Read secret values (Key Vault references, certificates via their secret).
  secretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  // Create, update and delete secrets (operators setting the credentials).
  secretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  // Create and import certificates (operators creating the marketplace certificate in the vault).
  certificatesOfficer: 'a4417e6f-fecd-4de8-b567-7b0420556985'
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    // Azure RBAC instead of access policies: the same role model as everything else here.
    enableRbacAuthorization: true
    // A deleted vault and its secrets stay recoverable for 7 days and cannot be purged earlier
    // (purge protection is irreversible). 7 days is the minimum: after `azd down` the vault name
    // is reserved for that long; recover it (`az keyvault recover`) to re-provision sooner.
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    enablePurgeProtection: true
    // checkov:skip=CKV_AZURE_109: Flex Consumption without VNet integration resolves Key Vault references over the public endpoint (App Service is not a trusted service for the firewall bypass); access is Entra ID + Azure RBAC only.
    // checkov:skip=CKV_AZURE_189: Same reason as CKV_AZURE_109: public network access is needed without VNet integration; every request still needs an Entra ID token and an RBAC role.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

// LANDING_FORM_SECRET signs the landing page's CSRF tokens. It is not a credential shared with
// anyone, so it is generated rather than typed in; rotating it only invalidates open forms.
resource landingFormSecretResource 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: 'landing-form-secret'
  properties: {
    // checkov:skip=CKV_AZURE_41: An expiry on this internal signing key would become an outage on a date nobody watches (the app could no longer resolve LANDING_FORM_SECRET); it is rotated on demand instead, see docs/deploy.md.
    value: landingFormSecret
    contentType: 'text/plain'
  }
}

resource appSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, appPrincipalId, roles.secretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.secretsUser)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource deployerSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(vault.id, deployerPrincipalId, roles.secretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.secretsOfficer)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

resource deployerCertificatesOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(vault.id, deployerPrincipalId, roles.certificatesOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.certificatesOfficer)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

output id string = vault.id
output name string = vault.name
// https://<vault>.vault.azure.net/ (with the trailing slash)
output uri string = vault.properties.vaultUri
