// Storage account for the Functions host (timer leases, keys, the deployment package) and for the
// app's own data (Table Storage) and lifecycle events (a Storage queue).
//
// Key-less by design: shared-key access is disabled, so no connection string or account key exists
// that could leak. Everything authenticates with Microsoft Entra ID: the Function App's managed
// identity gets only the data-plane roles it needs (assigned below, scoped to this account).

@description('Storage account name: 3-24 lowercase letters and digits, globally unique.')
@minLength(3)
@maxLength(24)
param name string

@description('Azure region.')
param location string

@description('Tags applied to the account.')
param tags object = {}

@description('Blob container that holds the Flex Consumption deployment package.')
param deploymentContainerName string

@description('Storage queue that receives subscription lifecycle events (EVENTS_QUEUE_NAME).')
param eventsQueueName string

@description('Principal (object) id of the Function App managed identity.')
param appPrincipalId string

@description('Storage redundancy. Geo-redundant by default: the tables hold the purchase and event history, which the Marketplace API cannot fully rebuild, and at this data volume GRS costs cents.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
  'Standard_RAGRS'
  'Standard_RAGZRS'
])
param skuName string = 'Standard_GRS'

// Built-in role definition ids (https://learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var roles = {
  // Host storage (AzureWebJobsStorage: keys, timer schedule monitor, leases) and the Flex deployment container.
  blobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  // Our own tables (the app creates them at start-up, which Contributor allows).
  tableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  // The lifecycle events queue, the work queues (send, receive, delete, update: the queue triggers) and host queues.
  queueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    // No account keys, no SAS signed with them: Entra ID only.
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    isLocalUserEnabled: false
    isSftpEnabled: false
    // checkov:skip=CKV_AZURE_35: Flex Consumption without VNet integration reaches storage over the public endpoint; with shared keys disabled every request needs an Entra ID token and a data role, so a deny-by-default firewall would only block the app itself.
    // checkov:skip=CKV_AZURE_59: Same reason as CKV_AZURE_35: public network access is required without VNet integration; access is identity-only.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }

  resource blobService 'blobServices' = {
    name: 'default'
    properties: {
      // Lets an operator recover an overwritten deployment package or host blob.
      deleteRetentionPolicy: {
        enabled: true
        days: 7
      }
      containerDeleteRetentionPolicy: {
        enabled: true
        days: 7
      }
    }

    resource deploymentContainer 'containers' = {
      name: deploymentContainerName
      properties: {
        publicAccess: 'None'
      }
    }
  }

  resource queueService 'queueServices' = {
    name: 'default'

    resource eventsQueue 'queues' = {
      name: eventsQueueName
    }

    // EVENTS_WORK_QUEUE: "deliver subscription X" jobs for the event_delivery queue trigger, and
    // the poison queue the host (and the use case, after MAX_JOB_ATTEMPTS) moves failing jobs to.
    resource eventsWorkQueue 'queues' = {
      name: '${eventsQueueName}-jobs'
    }

    resource eventsWorkPoisonQueue 'queues' = {
      name: '${eventsQueueName}-jobs-poison'
    }

    // OPERATIONS_WORK_QUEUE: "poll operation Y" jobs for the operation_followup queue trigger.
    resource operationsWorkQueue 'queues' = {
      name: '${eventsQueueName}-operations'
    }

    resource operationsWorkPoisonQueue 'queues' = {
      name: '${eventsQueueName}-operations-poison'
    }
  }

  // Tables are created by the app itself at start-up (TABLES_PREFIX + name); the table service
  // needs no configuration here.
}

resource appBlobDataOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, roles.blobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDataOwner)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appTableDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, roles.tableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.tableDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appQueueDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, roles.queueDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.queueDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output id string = storage.id
output name string = storage.name
// Endpoints without the trailing slash, in the form the app settings document
// (e.g. https://<account>.table.core.windows.net).
output blobEndpoint string = 'https://${storage.name}.blob.${environment().suffixes.storage}'
output queueEndpoint string = 'https://${storage.name}.queue.${environment().suffixes.storage}'
output tableEndpoint string = 'https://${storage.name}.table.${environment().suffixes.storage}'
output deploymentContainerUrl string = 'https://${storage.name}.blob.${environment().suffixes.storage}/${deploymentContainerName}'
